"""``streamrec models`` against a real Redis: list, show, pin, unpin, rollback, export, import.

Every command is run through the CLI's ``main`` and checked against both its
output and the parameter store's state. Export → import into a fresh namespace
(and into a second redis-server) must give byte-identical arrays and identical
scores; a changed file must be refused with nothing published.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from contracts.keys import KeySpace
from contracts.params import encode_params
from services.bandits import LinUCB, learner_from_params
from services.cli import main
from services.drn import DRNLearner, FeatureLayout
from services.drn.publish import published_arrays, published_meta
from services.models import ModelFileError, export_model, import_model, read_model_file
from services.paramstore import ParamStore
from services.serving.drn_policy import model_from_published
from services.stack.servers import start_redis

pytestmark = pytest.mark.integration

DIM = 4


class Bandit:
    """Two LinUCB partitions publishing parts ``p0``/``p1`` as the bandits service does."""

    def __init__(self, store: ParamStore, model: str) -> None:
        self.store, self.model = store, model
        self.learners = [LinUCB(dim=DIM, alpha=0.8, seed=0) for _ in range(2)]
        self.events = [0, 0]
        self.rng = np.random.default_rng(11)

    def learn_and_publish(self, partition: int, n: int = 50) -> int:
        items = self.rng.integers(0, 30, size=n)
        self.learners[partition].update(items, self.rng.normal(size=(n, DIM)), self.rng.random(n))
        self.events[partition] += n
        parts = {
            f"p{p}": encode_params(
                self.model,
                0,
                learner.state(),
                offsets={"feedback": {p: self.events[p]}},
                meta={"learner": "linucb", "partition": p, "events": self.events[p]},
            )
            for p, learner in enumerate(self.learners)
        }
        return self.store.publish(self.model, parts)


def served_scores(store: ParamStore, model: str) -> np.ndarray:
    version, header, arrays = store.latest(model, combine=LinUCB.merge)
    learner = learner_from_params(version, header, arrays)
    contexts = np.random.default_rng(5).normal(size=(40, DIM))
    return learner.score(np.arange(40), contexts)


def make_store(client: redis.Redis, keys: KeySpace) -> ParamStore:
    return ParamStore(client, keys=keys, registry=CollectorRegistry())


@pytest.fixture
def store(redis_client: redis.Redis, keyspace: KeySpace) -> ParamStore:
    return make_store(redis_client, keyspace)


@pytest.fixture
def bandit(store: ParamStore, unique_name: Callable[[str], str]) -> Bandit:
    bandit = Bandit(store, unique_name("linucb"))
    for partition in (0, 1, 0, 1):
        bandit.learn_and_publish(partition)
    return bandit


@pytest.fixture
def cli(
    redis_url: str, keyspace: KeySpace, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """Runs ``streamrec models ARGS`` on the test's namespace; (status, stdout, stderr)."""

    def run(*args: str, url: str = redis_url, namespace: str = keyspace.namespace) -> Any:
        capsys.readouterr()
        status = main(["models", *args, "--redis", url, "--namespace", namespace])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def test_list_shows_every_model_and_then_one_models_versions(
    cli: Callable[..., tuple[int, str, str]], bandit: Bandit, store: ParamStore
) -> None:
    status, out, _ = cli("list")
    assert status == 0
    assert out.splitlines()[0].split() == ["MODEL", "NEWEST", "SERVED", "RETAINED", "PIN"]
    assert out.splitlines()[1].split() == [bandit.model, "4", "4", "4", "-"]
    status, out, _ = cli("list", "--json")
    assert json.loads(out) == [
        {"model": bandit.model, "current": 4, "served": 4, "retained": 4, "pin": None}
    ]

    status, out, _ = cli("list", bandit.model)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "VERSION",
        "PUBLISHED",
        "(UTC)",
        "OFFSETS",
        "EVENTS",
        "SIZE",
        "STATE",
    ]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3", "4"]
    assert "feedback:0=100,feedback:1=100" in lines[4] and "200" in lines[4]
    assert lines[4].endswith("newest served")
    status, out, _ = cli("list", bandit.model, "--json")
    listed = json.loads(out)
    history = store.history(bandit.model)
    assert [v["version"] for v in listed["versions"]] == [1, 2, 3, 4]
    for row, info in zip(listed["versions"], history, strict=True):
        assert row["offsets"] == info.offsets
        assert row["events"] == info.events
        assert row["size_bytes"] == info.size_bytes
        assert row["digests"] == info.digests
        assert row["published_at"] == info.published_at > 0
    assert listed["versions"][0]["offsets"] == {"feedback:0": 50, "feedback:1": 0}
    assert listed["versions"][0]["events"] == 50
    assert (listed["current"], listed["served"], listed["pin"]) == (4, 4, None)


def test_show_prints_a_versions_parts_digests_and_offsets(
    cli: Callable[..., tuple[int, str, str]], bandit: Bandit, store: ParamStore
) -> None:
    status, out, _ = cli("show", bandit.model, "2")
    assert status == 0
    digests = store.digests(bandit.model, 2)
    for part, digest in digests.items():
        assert f"part {part}" in out and digest in out
    assert "learner    linucb (dim=4, alpha=0.8, ridge=1.0)" in out
    assert "version    2" in out and "feedback:0=50,feedback:1=50" in out
    assert "  array    gram <f8 (" in out and "  array    items <i8 (" in out

    status, out, _ = cli("show", bandit.model, "--json")
    shown = json.loads(out)
    assert shown["version"] == 4  # default: the version served
    assert shown["learner"] == "linucb" and shown["hyperparameters"]["alpha"] == 0.8
    parts = store.version_parts(bandit.model, 4)
    assert {p: s["sha256"] for p, s in shown["parts"].items()} == store.digests(bandit.model, 4)
    assert shown["parts"]["p1"]["meta"] == parts["p1"].meta
    assert shown["parts"]["p1"]["offsets"] == {"feedback": {"1": 100}}
    assert shown["parts"]["p0"]["arrays"]["items"]["dtype"] == "<i8"
    assert shown["offsets"] == {"feedback:0": 100, "feedback:1": 100}


def test_pin_serves_the_pinned_version_while_learners_keep_publishing(
    cli: Callable[..., tuple[int, str, str]], bandit: Bandit, store: ParamStore
) -> None:
    before = served_scores(store, bandit.model)
    status, out, _ = cli("pin", bandit.model, "4", "--reason", "incident 12")
    assert status == 0 and "pinned v4 by operator" in out and "incident 12" in out
    pin = store.pin_of(bandit.model)
    assert pin is not None and (pin.version, pin.by, pin.reason) == (4, "operator", "incident 12")
    assert bandit.learn_and_publish(0) == 5
    assert bandit.learn_and_publish(1) == 6
    assert store.current_version(bandit.model) == 6
    assert store.head(bandit.model)[0] == 4  # type: ignore[index]
    assert np.array_equal(served_scores(store, bandit.model), before)

    status, out, _ = cli("list", bandit.model)
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line[0].isdigit()}
    assert "served pinned (operator: incident 12)" in rows["4"]
    assert rows["6"].rstrip().endswith("newest")
    assert "pinned v4 by operator" in out.splitlines()[-1]
    _, out, _ = cli("list")
    assert "v4 by operator: incident 12" in out
    assert out.splitlines()[1].split()[1:3] == ["6", "4"]

    status, out, _ = cli("unpin", bandit.model)
    assert status == 0 and "unpinned v4" in out and "serving v6" in out
    assert store.pin_of(bandit.model) is None
    assert store.head(bandit.model)[0] == 6  # type: ignore[index]
    assert not np.array_equal(served_scores(store, bandit.model), before)
    status, out, _ = cli("unpin", bandit.model)
    assert status == 0 and "not pinned" in out


def test_rollback_pins_the_version_before_the_one_served(
    cli: Callable[..., tuple[int, str, str]], bandit: Bandit, store: ParamStore
) -> None:
    status, out, _ = cli("rollback", bandit.model)
    assert status == 0 and "rolled back" in out and "pinned v3" in out
    assert store.pin_of(bandit.model).version == 3  # type: ignore[union-attr]
    status, out, _ = cli("rollback", bandit.model, "--reason", "still bad")
    assert status == 0
    pin = store.pin_of(bandit.model)
    assert pin is not None and (pin.version, pin.reason) == (2, "still bad")
    status, out, _ = cli("rollback", bandit.model, "4")
    assert status == 0 and store.pin_of(bandit.model).version == 4  # type: ignore[union-attr]
    assert store.head(bandit.model)[0] == 4  # type: ignore[index]


def test_a_guard_pin_is_listed_as_guarded_and_an_operator_unpins_it(
    cli: Callable[..., tuple[int, str, str]], bandit: Bandit, store: ParamStore
) -> None:
    store.pin(bandit.model, 3, reason="reward fell 40% (p<0.01)", by="guard")
    status, out, _ = cli("list", bandit.model)
    assert status == 0
    row = next(line for line in out.splitlines() if line.startswith("3 "))
    assert "served guarded (guard: reward fell 40% (p<0.01))" in row
    _, out, _ = cli("list", "--json")
    assert json.loads(out)[0]["pin"]["by"] == "guard"
    status, out, _ = cli("unpin", bandit.model)
    assert status == 0 and "unpinned v3 (guard: reward fell 40% (p<0.01))" in out
    assert store.pin_of(bandit.model) is None


def test_unknown_models_versions_and_bad_input_exit_2(
    cli: Callable[..., tuple[int, str, str]], bandit: Bandit, store: ParamStore, tmp_path: Path
) -> None:
    for args in (
        ("list", "nope"),
        ("show", "nope"),
        ("pin", "nope", "1"),
        ("unpin", "nope"),
        ("rollback", "nope"),
        ("export", "nope", str(tmp_path / "x.safetensors")),
    ):
        status, out, err = cli(*args)
        assert status == 2, args
        assert "'nope'" in err and out == ""
    unknown_versions: list[tuple[str, ...]] = [
        ("show", bandit.model, "99"),
        ("pin", bandit.model, "99"),
        ("rollback", bandit.model, "99"),
        ("export", bandit.model, "99", str(tmp_path / "x.safetensors")),
    ]
    for call in unknown_versions:
        status, _, err = cli(*call)
        assert status == 2 and "99" in err, call
    assert store.pin_of(bandit.model) is None
    assert not (tmp_path / "x.safetensors").exists()
    status, _, err = cli("list", "bad{name}")
    assert status == 2 and "model name" in err
    status, _, err = cli("import", str(tmp_path / "missing.safetensors"))
    assert status == 2 and "missing.safetensors" in err
    status, _, err = cli("rollback", bandit.model, "1")
    assert status == 0
    status, _, err = cli("rollback", bandit.model)
    assert status == 2 and "older" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "pin", bandit.model, "zero"])
    assert exit_info.value.code == 2


def test_an_unreachable_redis_exits_1(cli: Callable[..., tuple[int, str, str]]) -> None:
    status, _, err = cli("list", url="redis://127.0.0.1:1/0")
    assert status == 1 and "Redis" in err


def test_export_then_import_into_a_fresh_namespace_is_exact(
    cli: Callable[..., tuple[int, str, str]],
    bandit: Bandit,
    store: ParamStore,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    path = tmp_path / "linucb.safetensors"
    status, out, _ = cli("export", bandit.model, path.as_posix())
    assert status == 0 and f"exported {bandit.model} v4 (p0, p1;" in out
    fresh = KeySpace(f"{store.keys.namespace}x")
    status, out, _ = cli("import", path.as_posix(), namespace=fresh.namespace)
    assert status == 0 and f"as {bandit.model} v1 (p0, p1)" in out

    other = make_store(redis_client, fresh)
    original = store.version_parts(bandit.model, 4)
    imported = other.version_parts(bandit.model, 1)
    assert other.digests(bandit.model, 1) == store.digests(bandit.model, 4)
    for part, params in original.items():
        assert imported[part].checksum == params.checksum
        assert imported[part].meta == params.meta
        assert imported[part].offsets == params.offsets
        assert imported[part].created_at == params.created_at
        assert imported[part].arrays.keys() == params.arrays.keys()
        for name, array in params.arrays.items():
            assert imported[part].arrays[name].dtype == array.dtype
            assert imported[part].arrays[name].tobytes() == array.tobytes()
    assert np.array_equal(served_scores(other, bandit.model), served_scores(store, bandit.model))
    info = other.history(bandit.model)[-1]
    assert (info.offsets, info.events) == (store.history(bandit.model)[-1].offsets, 200)

    # Importing the same file again makes no version: the store already holds those blobs.
    status, out, _ = cli("import", path.as_posix(), namespace=fresh.namespace)
    assert status == 0 and "v1" in out and other.current_version(bandit.model) == 1


def test_export_of_an_older_or_pinned_version_and_import_under_another_name(
    cli: Callable[..., tuple[int, str, str]], bandit: Bandit, store: ParamStore, tmp_path: Path
) -> None:
    store.pin(bandit.model, 2, reason="test")
    pinned = served_scores(store, bandit.model)
    path = tmp_path / "pinned.safetensors"
    status, out, _ = cli("export", bandit.model, path.as_posix())
    assert status == 0 and "v2" in out
    assert read_model_file(path.read_bytes()).source_version == 2
    status, out, _ = cli("export", bandit.model, "3", (tmp_path / "v3.safetensors").as_posix())
    assert (
        status == 0
        and read_model_file((tmp_path / "v3.safetensors").read_bytes()).source_version == 3
    )

    copy = f"{bandit.model}-copy"
    status, out, _ = cli("import", path.as_posix(), "--as", copy)
    assert status == 0 and f"as {copy} v1" in out
    parts = store.version_parts(copy, 1)
    assert {p.model for p in parts.values()} == {copy}
    original = store.version_parts(bandit.model, 2)
    for part, params in original.items():
        assert parts[part].meta == params.meta and parts[part].offsets == params.offsets
        for name, array in params.arrays.items():
            assert parts[part].arrays[name].tobytes() == array.tobytes()
    assert np.array_equal(served_scores(store, copy), pinned)

    # Into the pinned model itself: a new version, which serving takes once unpinned.
    status, out, _ = cli("import", (tmp_path / "v3.safetensors").as_posix())
    assert status == 0 and f"{bandit.model} stays pinned at v2" in out
    newest = store.current_version(bandit.model)
    assert newest == 5 and store.digests(bandit.model, 5) == store.digests(bandit.model, 3)
    assert store.head(bandit.model)[0] == 2  # type: ignore[index]


def tampered_files(data: bytes) -> dict[str, bytes]:
    (length,) = struct.unpack_from("<Q", data)
    start = 8 + length
    flipped = bytearray(data)
    flipped[start + (len(data) - start) // 3] ^= 0x40
    table = json.loads(data[8:start])
    header = json.loads(table["__metadata__"]["header"])
    header["parts"]["p0"]["header"]["meta"]["events"] += 1
    table["__metadata__"]["header"] = json.dumps(header)
    head = json.dumps(table).encode()
    return {
        "flipped tensor byte": bytes(flipped),
        "edited metadata": struct.pack("<Q", len(head)) + head + data[start:],
        "truncated": data[: len(data) - 100],
        "truncated header": data[: start - 10],
        "not a model file": b"\x00" * 64,
    }


def test_a_tampered_file_is_refused_and_nothing_is_published(
    cli: Callable[..., tuple[int, str, str]],
    bandit: Bandit,
    store: ParamStore,
    redis_client: redis.Redis,
    tmp_path: Path,
) -> None:
    data = export_model(store, bandit.model)
    fresh = KeySpace(f"{store.keys.namespace}t")
    other = make_store(redis_client, fresh)
    expected = {
        "flipped tensor byte": "tensor checksum mismatch",
        "edited metadata": "header checksum mismatch",
        "truncated": "tensor checksum mismatch",
        "truncated header": "truncated",
        "not a model file": "not a safetensors file",
    }
    for what, forged in tampered_files(data).items():
        path = tmp_path / f"{what}.safetensors"
        path.write_bytes(forged)
        status, out, err = cli("import", path.as_posix(), namespace=fresh.namespace)
        assert status == 2, what
        assert f"refused {path}: " in err and expected[what] in err, (what, err)
        assert out == ""
        with pytest.raises(ModelFileError):
            import_model(other, forged)
    assert other.models() == [] and other.current_version(bandit.model) is None
    assert redis_client.keys(f"{fresh.namespace}:*") == []


def test_import_refuses_a_model_with_parts_the_file_lacks(
    cli: Callable[..., tuple[int, str, str]], bandit: Bandit, store: ParamStore, tmp_path: Path
) -> None:
    path = tmp_path / "two.safetensors"
    assert cli("export", bandit.model, path.as_posix())[0] == 0
    wider = f"{bandit.model}-wide"
    extra = encode_params(wider, 0, {"x": np.zeros(2)}, meta={"learner": "linucb"})
    store.publish(wider, {"p2": extra})
    status, _, err = cli("import", path.as_posix(), "--as", wider)
    assert status == 2 and "['p2']" in err and "--as" in err
    assert store.current_version(wider) == 1


@pytest.fixture
def second_redis(tmp_path: Path) -> Iterator[str]:
    server = start_redis(tmp_path / "second-redis")
    try:
        yield server.url
    finally:
        server.stop()


def test_a_drn_model_moves_to_another_redis_server_and_scores_identically(
    cli: Callable[..., tuple[int, str, str]],
    store: ParamStore,
    second_redis: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    layout = FeatureLayout(embedding_dim=3, n_context=1)
    learner = DRNLearner(layout.state_dim, layout.action_dim, hidden=(16, 8), seed=4)
    learner.minor_update("explore")
    model = unique_name("drn")
    blob = encode_params(
        model,
        0,
        published_arrays(learner.weights(), learner.explore_weights()),
        offsets={"feedback": {0: 10, 1: 12}},
        meta=published_meta(learner.explore_version, layout) | {"applied": 22},
    )
    store.publish(model, {"main": blob})
    path = tmp_path / "drn.safetensors"
    assert cli("export", model, path.as_posix())[0] == 0
    status, out, _ = cli("import", path.as_posix(), url=second_redis, namespace="moved")
    assert status == 0 and f"as {model} v1" in out

    rng = np.random.default_rng(2)
    state = rng.normal(size=layout.state_dim)
    actions = rng.normal(size=(30, layout.action_dim))
    with ParamStore.from_url(second_redis, keys=KeySpace("moved")) as there:
        moved = model_from_published(*there.latest(model))
        assert there.digests(model, 1) == store.digests(model, 1)
    here = model_from_published(*store.latest(model))
    for a, b in ((moved.online, here.online), (moved.explore, here.explore)):
        assert np.array_equal(a.score(state, actions), b.score(state, actions))
    assert moved.explore_version == here.explore_version and moved.layout == layout
