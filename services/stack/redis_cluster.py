"""An embedded Redis Cluster for tests and benchmarks: N masters on loopback ports.

Each master is a ``redis-server --cluster-enabled yes`` process (the binary
:func:`~services.stack.servers.find_redis_server` finds) with its own directory
and ``nodes.conf``. The cluster is formed the way ``redis-cli --cluster create``
does it, through redis-py alone: every node gets a distinct config epoch and an
even share of the 16384 slots (``CLUSTER ADDSLOTS``), then the first node meets
the others (``CLUSTER MEET``). :func:`start_redis_cluster` returns once every
node reports ``cluster_state:ok`` and sees exactly the slot map that was assigned.

By default there are no replicas: a stopped master takes its slots down with it,
and :meth:`EmbeddedRedisCluster.start_node` brings it back on the same port with
its ``nodes.conf`` (same node id, same slots) but without its data, since nothing
is persisted. That is what fault tests want: the slot's keys are lost, the rest of
the cluster keeps them.

With ``replicas=N`` each master gets N replicas (``CLUSTER REPLICATE``, as
``redis-cli --cluster create --cluster-replicas N`` would do), and a master that
dies is replaced: once the other masters agree it failed (about
``cluster-node-timeout`` after it stopped answering) one of its replicas is
promoted and takes its slots, with whatever the asynchronous replication had
copied (:meth:`EmbeddedRedisCluster.wait_failover`).

Redis 6.2 derives a node's cluster bus port from its client port (+10000), so
ports are picked with both free.

>>> slot_ranges(3)
[(0, 5460), (5461, 10922), (10923, 16383)]
"""

from __future__ import annotations

import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import redis

from services.stack.servers import (
    ManagedProcess,
    ServerError,
    find_redis_server,
    free_port,
    wait_healthy,
)

#: Hash slots of a Redis Cluster.
SLOTS = 16384
#: Redis (before 7.0) listens for its cluster bus on the client port plus this.
BUS_PORT_OFFSET = 10000
#: Highest client port whose bus port is still a valid port.
_MAX_PORT = 65535 - BUS_PORT_OFFSET


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Inclusive slot ranges splitting the 16384 slots evenly over ``masters`` nodes."""
    if not 1 <= masters <= SLOTS:
        raise ValueError(f"masters must be between 1 and {SLOTS}, got {masters}")
    bounds = [round(i * SLOTS / masters) for i in range(masters + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(masters)]


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port(taken: Collection[int] = (), attempts: int = 100) -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too.

    Neither may be in ``taken``: ports of nodes started but perhaps not yet listening.
    """
    for _ in range(attempts):
        port = free_port()
        bus = port + BUS_PORT_OFFSET
        if port <= _MAX_PORT and not {port, bus} & set(taken) and _port_free(bus):
            return port
    raise ServerError(f"no free port pair (port, port + {BUS_PORT_OFFSET}) found")


def _admin(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2.0, decode_responses=True)


def _slot_map(client: redis.Redis) -> dict[tuple[int, int], str]:
    """The node's view of the cluster: slot range -> node id of its master."""
    rows = client.execute_command("CLUSTER", "SLOTS")
    return {(int(row[0]), int(row[1])): str(row[2][2]) for row in rows}


def cluster_info(client: redis.Redis) -> dict[str, str]:
    """``CLUSTER INFO`` as a dict (``cluster_state``, ``cluster_known_nodes``, ...)."""
    raw = str(client.execute_command("CLUSTER", "INFO"))
    return dict(line.split(":", 1) for line in raw.splitlines() if ":" in line)


def _ping(clients: list[redis.Redis]) -> None:
    for client in clients:
        client.ping()


def _check_views(clients: list[redis.Redis], expected: dict[tuple[int, int], str]) -> None:
    """Raise unless every node says ``cluster_state:ok`` and sees exactly ``expected``."""
    for client in clients:
        state = cluster_info(client).get("cluster_state")
        if state != "ok":
            raise ServerError(f"cluster_state is {state}")
        seen = _slot_map(client)
        if seen != expected:
            raise ServerError(f"slot map {seen} differs from the one assigned")


def _replication_up(client: redis.Redis) -> None:
    """Raise unless the node is a replica whose link to its master is up (initial sync done)."""
    info = client.info("replication")
    if info.get("role") != "slave" or info.get("master_link_status") != "up":
        raise ServerError(f"replica role {info.get('role')}, link {info.get('master_link_status')}")


@dataclass
class EmbeddedRedisCluster:
    """Redis Cluster nodes on loopback ports; see :func:`start_redis_cluster`.

    Masters come first in :attr:`nodes` and :attr:`processes`, then the replicas:
    replica ``k`` of master ``i`` is node ``masters + i * replicas + k``.
    """

    processes: list[ManagedProcess]
    nodes: list[int]
    #: Slot range -> node id of the master that owns it.
    slot_owners: dict[tuple[int, int], str]
    timeout: float
    #: Replicas of each master.
    replicas: int = 0
    #: Node id of each node, in the order of :attr:`nodes`.
    ids: list[str] = field(default_factory=list)

    @property
    def masters(self) -> int:
        """How many masters the cluster was formed with."""
        return len(self.nodes) // (1 + self.replicas)

    def replicas_of(self, index: int) -> list[int]:
        """Indexes of the nodes formed as replicas of master ``index``."""
        first = self.masters + index * self.replicas
        return list(range(first, first + self.replicas))

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node, the first first (see ``clients.redis_from_url``).

        Any one node is enough to find the cluster; listing all lets a client
        connect while one of them is stopped.
        """
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.nodes)
        return f"redis+cluster://{hosts}/0"

    def node_of_slot(self, slot: int) -> int:
        """Index (into :attr:`nodes`) of the master that serves ``slot``.

        That is the master it was assigned to, or the replica that took over after a
        :meth:`wait_failover`.
        """
        if not 0 <= slot < SLOTS:
            raise ValueError(f"slot {slot} is not between 0 and {SLOTS - 1}")
        owner = next(
            node for (start, end), node in self.slot_owners.items() if start <= slot <= end
        )
        return self.ids.index(owner)

    def kill_node(self, index: int) -> None:
        """SIGKILL one node: no shutdown, no last write; its slots stay down (no replicas)
        or move to a replica (:meth:`wait_failover`)."""
        process = self.processes[index]
        if process.alive():
            assert process.popen is not None
            process.popen.kill()
            process.popen.wait()

    def wait_failover(self, index: int) -> int:
        """Wait until a replica has taken over every slot of the stopped master ``index``
        and every running node says ``cluster_state:ok``; returns the new master's index.

        :attr:`slot_owners` follows the change, so :meth:`node_of_slot` and
        :meth:`wait_healthy` (after the old master is started again, as a replica of the
        new one) see the new owner.
        """
        old = self.ids[index]
        ranges = [span for span, owner in self.slot_owners.items() if owner == old]
        running = [n for n, process in enumerate(self.processes) if process.alive()]
        clients = [_admin(self.nodes[n]) for n in running]
        taken: dict[tuple[int, int], str] = {}

        def promoted() -> None:
            views = []
            for client in clients:
                state = cluster_info(client).get("cluster_state")
                if state != "ok":
                    raise ServerError(f"cluster_state is {state}")
                views.append(_slot_map(client))
            if any(view != views[0] for view in views):
                raise ServerError("the running nodes disagree on the slot map")
            owners = {views[0].get(span) for span in ranges}
            if len(owners) != 1 or None in owners or old in owners:
                raise ServerError(f"the slots of {old} are owned by {owners}")
            taken.update(views[0])

        try:
            wait_healthy(promoted, "redis cluster failover", self.timeout, [])
        finally:
            for client in clients:
                client.close()
        self.slot_owners = taken
        return self.ids.index(taken[ranges[0]])

    def stop_node(self, index: int) -> None:
        """Stop one master; its slots are down until :meth:`start_node`."""
        self.processes[index].stop()

    def start_node(self, index: int) -> None:
        """Restart a stopped master on its port and wait until the whole cluster is ok again.

        It rejoins with its ``nodes.conf`` (same id and slots) and no data.
        """
        self.start_nodes([index])

    def start_nodes(self, indexes: Iterable[int]) -> None:
        """:meth:`start_node` for several stopped masters at once (all of them, say)."""
        for index in indexes:
            process = self.processes[index]
            if process.alive():
                raise ServerError(f"redis cluster node {self.nodes[index]} is running")
            process.start()
        self.wait_healthy()

    def wait_healthy(self) -> None:
        """Wait until every node is up, says ``cluster_state:ok`` and sees the assigned
        slots, and every replica has synced with its master."""
        clients = [_admin(port) for port in self.nodes]
        owners = set(self.slot_owners.values())
        replicas = [
            client
            for client, node_id in zip(clients, self.ids, strict=True)
            if node_id not in owners
        ]

        def healthy() -> None:
            _check_views(clients, self.slot_owners)
            for client in replicas:
                _replication_up(client)

        try:
            wait_healthy(healthy, "redis cluster", self.timeout, self.processes)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        """Stop every node (their directories stay)."""
        for process in reversed(self.processes):
            process.stop()


def _argv(port: int, data_dir: Path, node_timeout_ms: int) -> list[str]:
    return [
        str(find_redis_server()),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        str(node_timeout_ms),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--appendonly",
        "no",
        "--save",
        "",
        "--protected-mode",
        "yes",
    ]


def _form(cluster: EmbeddedRedisCluster) -> None:
    """Give each master its epoch and slots, introduce the nodes to each other, record
    the owners, and make the other nodes replicas of their masters."""
    clients = [_admin(port) for port in cluster.nodes]
    try:
        wait_healthy(
            lambda: _ping(clients),
            "redis cluster nodes",
            cluster.timeout,
            cluster.processes,
        )
        cluster.ids[:] = [str(client.execute_command("CLUSTER", "MYID")) for client in clients]
        ranges = slot_ranges(cluster.masters)
        for epoch, (client, (start, end)) in enumerate(zip(clients, ranges, strict=False), 1):
            # Distinct epochs up front spare the cluster its epoch-collision rounds.
            client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            client.execute_command("CLUSTER", "ADDSLOTS", *range(start, end + 1))
            cluster.slot_owners[start, end] = cluster.ids[epoch - 1]
        for port in cluster.nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        for master in range(cluster.masters):
            for replica in cluster.replicas_of(master):
                # Refused ("Unknown node") until the gossip has told the replica of its master.
                replicate = partial(
                    clients[replica].execute_command, "CLUSTER", "REPLICATE", cluster.ids[master]
                )
                wait_healthy(replicate, "redis cluster replica", cluster.timeout, cluster.processes)
    finally:
        for client in clients:
            client.close()


def start_redis_cluster(
    data_dir: Path,
    masters: int = 3,
    *,
    replicas: int = 0,
    node_timeout_ms: int = 3000,
    timeout: float = 30.0,
) -> EmbeddedRedisCluster:
    """Start ``masters`` cluster-enabled redis-servers, form the cluster and wait until it is ok.

    ``replicas`` more nodes per master replicate it and take over its slots if
    it fails. ``node_timeout_ms`` is ``cluster-node-timeout``: how long a stopped
    master goes unnoticed before a replica is promoted (and, doubled, how long a
    restarted one may take to be taken back). ``timeout`` bounds each wait for
    health, here and in :meth:`EmbeddedRedisCluster.start_node`.
    """
    slot_ranges(masters)  # validates the count before anything starts
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    data_dir = Path(data_dir)
    cluster = EmbeddedRedisCluster([], [], {}, timeout, replicas)
    try:
        for index in range(masters * (1 + replicas)):
            taken = cluster.nodes + [port + BUS_PORT_OFFSET for port in cluster.nodes]
            port = cluster_port(taken)
            node_dir = data_dir / f"node-{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            process = ManagedProcess(
                f"redis-cluster-{index}",
                _argv(port, node_dir, node_timeout_ms),
                node_dir / "redis.log",
            )
            cluster.processes.append(process.start())
            cluster.nodes.append(port)
        _form(cluster)
        cluster.wait_healthy()
    except BaseException:
        cluster.stop()
        raise
    return cluster
