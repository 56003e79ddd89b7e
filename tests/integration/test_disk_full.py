"""Disk full under the snapshot store: the embeddings service as a process, on a 2 MiB tmpfs.

The fault-matrix row "disk full for snapshots". The design (see
services/embeddings/service.py) is that a snapshot is derived from a
checkpoint: the checkpoint in Redis (model, click statistics, offsets) is the
truth and advances whatever the disk does, and every snapshot is built from a
checkpointed model, then written (index file, then manifest) and only then
pointed at. So while the disk is full the checkpoint moves on past what the
newest snapshot holds, the pointer stays on the last verified snapshot, and
once there is room again the next snapshot is built from the model that holds
every click: nothing is lost, the published index only lags.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from contracts.events import Click
from contracts.keys import KeySpace
from contracts.params import decode_params
from services.embeddings.service import ItemStats
from services.index import Pointer, ReloadableIndex, SnapshotStore, read_pointer, read_snapshot
from services.stack.servers import free_port
from tests.integration.processes import ServiceProcess, wait_for
from tests.integration.test_bandit_loop import _produce

pytestmark = pytest.mark.integration

TS = 1.7e9
HALF_LIFE = 1e12  # far beyond the stream's span: an item's popularity score is its click count
PAGE = os.sysconf("SC_PAGE_SIZE")
FAILURES = "streamrec_embeddings_publish_failures_total"


@contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"a small tmpfs is needed to fill a disk; mount refused: {mounted.stderr}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path, leave_pages: int) -> Path:
    """Write a filler file until ENOSPC, then give back ``leave_pages`` pages of it."""
    filler = directory / "filler"
    chunk = b"\0" * (64 * 1024)
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    pages = math.ceil(filler.stat().st_size / PAGE)
    os.truncate(filler, (pages - leave_pages) * PAGE)
    assert shutil.disk_usage(directory).free == leave_pages * PAGE
    return filler


def _clicks(n: int, items: list[str], start: int) -> list[Click]:
    return [
        Click(
            event_id=f"e{start + i}",
            user_id=f"u{(start + i) % 53}",
            item_id=items[(i * 7) % len(items)],
            ts=TS + (start + i) / 1000,
        )
        for i in range(n)
    ]


def _checkpointed(
    client: redis.Redis, keys: KeySpace, group: str, topic: str
) -> tuple[int, dict[str, float]]:
    """Clicks the group's checkpoints cover, and the click scores the checkpointed model holds.

    Both partitions' checkpoints are read in one transaction, as they are written.
    """
    pipe = client.pipeline(transaction=True)
    for partition in (0, 1):
        pipe.hmget(keys.checkpoint(group, partition), ["offsets", "state"])
    consumed, scores = 0, {}
    for offsets, state in pipe.execute():
        consumed += json.loads(offsets).get(topic, 0) if offsets else 0
        if state:
            arrays = decode_params(state).arrays
            stats = {
                k.removeprefix("stats/"): v for k, v in arrays.items() if k.startswith("stats/")
            }
            scores = ItemStats.from_state(stats, HALF_LIFE).scores
    return consumed, scores


def _metric(port: int, name: str, absent: float | None = None, **labels: str) -> float:
    """A sample scraped from a service process's /metrics (labels: those it must carry);
    ``absent`` is what a series not exported (yet) counts as, else it is an error."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    if absent is not None:
        return absent
    raise AssertionError(f"{name} {labels} is not exported")


def _files(directory: Path) -> set[str]:
    return {entry.name for entry in directory.iterdir()}


def _snapshot_files(versions: list[int]) -> set[str]:
    return {f"{v:012d}{suffix}" for v in versions for suffix in (".faiss", ".manifest.json")}


def _popular(client: redis.Redis, keys: KeySpace) -> set[str]:
    members = cast(list[bytes], client.zrange(keys.catalog_popular(), 0, -1))
    return {item.decode() for item in members}


def _items_of(pointer: Pointer, root: Path) -> set[str]:
    """The items of the snapshot ``pointer`` names, read and verified as serving reads it."""
    _, item_ids, manifest = read_snapshot(
        Path(pointer.path), expected_sha256=pointer.sha256, root=root
    )
    assert manifest.version == pointer.version
    return set(item_ids)


def test_a_full_snapshot_disk_keeps_the_last_snapshot_and_publishes_everything_once_freed(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topic_factory: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """ENOSPC on the snapshot store: the service lives on, the pointer stays verified,
    the failure is counted, and freeing the disk publishes every click with no new one."""
    clicks_topic = topic_factory("clicks", partitions=2)
    group = unique_name("embeddings")
    port = free_port()
    old_items = [f"a{k}" for k in range(120)]
    new_items = [f"b{k}" for k in range(60)]
    before = _clicks(3_000, old_items, start=0)
    during = _clicks(2_000, old_items[:40] + new_items, start=3_000)
    expected = Counter(click.item_id for click in before + during)
    key = keyspace.index_current("items")

    with _tmpfs(tmp_path / "snapshots", "2m") as directory:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "REDIS_URL": redis_url,
            "REDIS_NAMESPACE": keyspace.namespace,
            "STREAMREC_TOPIC_CLICKS": clicks_topic,
            "STREAMREC_TOPIC_DEAD_LETTER": topic_factory("dlq"),
            "STREAMREC_EMBEDDINGS_GROUP": group,
            "STREAMREC_SNAPSHOT_DIR": str(directory),
            "STREAMREC_EMBEDDINGS_PUBLISH_INTERVAL_S": "0.5",
            "STREAMREC_EMBEDDINGS_DIM": "8",
            "STREAMREC_EMBEDDINGS_POPULARITY_HALF_LIFE_S": str(HALF_LIFE),
            "STREAMREC_RUNTIME_METRICS_PORT": str(port),
        }
        log = tmp_path / "embeddings.log"
        service = ServiceProcess("embeddings", env, log).start()
        reader = ReloadableIndex(redis_client, key, poll_interval=0.1, snapshot_dir=directory)
        swap_failures = "streamrec_index_swap_failures_total"
        try:
            _produce(kafka_bootstrap, clicks_topic, before)
            wait_for(
                lambda: (
                    reader.version is not None and set(reader.current.item_ids) == set(old_items)
                ),
                90,
                "a snapshot of every item clicked before the disk fills",
            )
            last = read_pointer(redis_client, key)
            assert last is not None and last.version == reader.version
            store = SnapshotStore(directory)
            complete = store.versions()
            # Two pages free: the next index file (at most ~250 items x 8 floats) fits,
            # its manifest does not: each attempt fails half way through the snapshot.
            filler = _fill(directory, leave_pages=2)

            _produce(kafka_bootstrap, clicks_topic, during)
            wait_for(
                lambda: _checkpointed(redis_client, keyspace, group, clicks_topic)[0] == 5_000,
                60,
                "the checkpoint to cover every click while the disk is full",
            )
            wait_for(lambda: _metric(port, FAILURES) >= 1, 30, "a failed snapshot write counted")
            time.sleep(1.0)  # more publish intervals: nothing may get through meanwhile

            assert service.alive(), log.read_text()[-3000:]
            assert "No space left on device" in log.read_text()
            # The pointer did not move and still names a verified, loadable snapshot.
            assert read_pointer(redis_client, key) == last
            assert _items_of(last, directory) == set(old_items)
            # Nothing of the failed snapshot is left (its index file was written before
            # its manifest failed): no half-written snapshot, no temporary file.
            assert store.versions() == complete
            assert _files(directory) == _snapshot_files(complete) | {filler.name}
            assert reader.version == last.version
            assert reader.registry.get_sample_value(swap_failures) == 0
            # The popular list is published with its snapshot: it still names only old items.
            assert _popular(redis_client, keyspace) == set(old_items)
            # The checkpoint moved on by design: it, not the snapshot, is the truth.
            _, scores = _checkpointed(redis_client, keyspace, group, clicks_topic)
            assert not set(new_items) & set(reader.current.item_ids)
            assert scores == pytest.approx(dict(expected), rel=1e-6)

            # Room again, and no new click: the failed snapshot is retried and published.
            filler.unlink()
            wait_for(
                lambda: (read_pointer(redis_client, key) or last).version > last.version,
                30,
                "a snapshot once the disk has room again, without new clicks",
            )
            now = read_pointer(redis_client, key)
            assert now is not None
            assert _items_of(now, directory) == set(expected)
            assert reader.wait_for_version(now.version, timeout=30)
            assert set(reader.current.item_ids) == set(expected)
            assert _popular(redis_client, keyspace) == set(expected)
            assert reader.registry.get_sample_value(swap_failures) == 0
            consumed, scores = _checkpointed(redis_client, keyspace, group, clicks_topic)
            assert consumed == len(before) + len(during)
            assert scores == pytest.approx(dict(expected), rel=1e-6)
            failures = _metric(port, FAILURES)
            time.sleep(1.0)
            assert _metric(port, FAILURES) == failures, "no failure once the disk has room"
            assert now.version == complete[-1] + 1
            assert _files(directory) == _snapshot_files(store.versions())
            assert service.alive()
        finally:
            reader.close()
            exit_code = service.stop()
        assert exit_code == 0, log.read_text()[-3000:]
