"""The store on S3 through TensorStore's s3 driver, against a real S3-compatible server (moto's
server mode) started on 127.0.0.1 by the tests: round trips, integrity, the marker commit
protocol (racing commits, a crash between data and marker, interrupted deletion, concurrent
annotations), garbage collection, clear errors for a missing bucket and a wrong endpoint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from _store_worker import PROMPT_LEN, synthetic_state

from vinekv.cli import main
from vinekv.kvstore import SnapshotStore, StoreError
from vinekv.kvstore.backends import marker as commit_marker
from vinekv.kvstore.backends.marker import MarkerCommit

pytest.importorskip("moto", reason="the S3 tests need moto's server (pip install -e '.[s3]')")
boto3 = pytest.importorskip("boto3")

LENGTH = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail("moto's S3 server did not start")
            time.sleep(0.2)
    yield url
    server.kill()
    server.wait()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):
    """A fresh bucket and the standard variables that point TensorStore and boto3 at the server."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    bucket = f"vinekv-{time.monotonic_ns()}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


@pytest.mark.parametrize("codec", ["lossless", "int8"])
def test_round_trip_on_s3(s3_env, codec):
    url = f"s3://{s3_env}/stores/a"
    states = [synthetic_state(n, length=LENGTH) for n in range(3)]
    with SnapshotStore.open(url, codec=codec) as store:
        for n, state in enumerate(states):
            store.spill("r", f"t{n}", state, PROMPT_LEN, reward=float(n))
        store.flush()
        store.annotate("r", "t1", note="valued")
    with SnapshotStore.open(url, mode="r") as store:
        assert store.trajectories("r") == ["t0", "t1", "t2"] and store.verify() == []
        assert store.trajectory_info("r", "t1")["fields"] == {"reward": 1.0, "note": "valued"}
        for n, state in enumerate(states):
            for t in (5, PROMPT_LEN, 100, LENGTH):
                got = store.read_prefix("r", f"t{n}", t)
                bound = 0 if codec == "lossless" else np.abs(state.keys).max() / 127
                assert np.abs(got.keys - state.keys[:, :, :t]).max() <= bound
                np.testing.assert_array_equal(got.token_ids, state.token_ids[:, :t])
    keys = _keys(s3_env, "stores/a/runs/r/prompts/")
    assert len({k.split("/")[5] for k in keys} - {"zarr.json"}) == 1  # one prompt node, shared


def _keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _attempts(bucket: str, node: str) -> set[str]:
    """The attempt folders under a node prefix (``stores/x/runs/r/trajectories/t0/``)."""
    return {k[len(node) :].split("/")[0] for k in _keys(bucket, node) if k[len(node) :].startswith("attempt-")}


def test_damage_on_s3_is_named(s3_env):
    url = f"s3://{s3_env}/stores/b"
    with SnapshotStore.open(url, codec="int8") as store:
        store.spill("r", "t0", synthetic_state(0, length=LENGTH), PROMPT_LEN)
    (attempt,) = _attempts(s3_env, "stores/b/runs/r/trajectories/t0/")
    key = f"stores/b/runs/r/trajectories/t0/{attempt}/q/zarr.json"
    boto3.client("s3").delete_object(Bucket=s3_env, Key=key)
    with SnapshotStore.open(url, mode="r") as store:
        (problem,) = store.verify()
    assert problem.message == f"s3://{s3_env}/{key} is missing (array metadata of a committed node)"


def test_a_missing_bucket_and_a_wrong_endpoint_are_clear_errors(s3_env, monkeypatch):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        SnapshotStore.open("s3://no-such-bucket/x", codec="int8")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setattr(commit_marker, "OBJECT_STORE_TIMEOUT_S", 2.0)
    start = time.monotonic()
    with pytest.raises(StoreError, match=r"no answer from http://127.0.0.1:\d+ within 2.0 s; set the endpoint"):
        SnapshotStore.open(f"s3://{s3_env}/x", mode="r")
    assert time.monotonic() - start < 10


def test_zarr_python_reads_the_s3_store(s3_env, s3_endpoint):
    """zarr-python alone (FsspecStore over s3fs) reads what the store wrote to S3, and its
    dequantised KV equals `read_prefix`'s."""
    zarr = pytest.importorskip("zarr")
    pytest.importorskip("s3fs")
    url = f"s3://{s3_env}/stores/z"
    state = synthetic_state(3, length=LENGTH)
    with SnapshotStore.open(url, codec="int8") as store:
        store.spill("r", "t0", state, PROMPT_LEN)
        store.flush()
        ours = store.read_prefix("r", "t0", LENGTH)
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    group = zarr.open_group(zarr.storage.FsspecStore.from_url(url, storage_options=options, read_only=True), mode="r")
    traj = group["runs/r/trajectories/t0"]
    prompt = group[f"runs/r/prompts/{traj.attrs['vinekv']['prompt']}"]
    data = [node.attrs["vinekv"]["data"] for node in (prompt, traj)]  # the attempt each marker names
    kv = np.concatenate(
        [
            node[f"{d}q"][:] * node[f"{d}scale"][:][..., None].astype(np.float32)
            for node, d in zip((prompt, traj), data, strict=True)
        ],
        axis=2,
    )
    np.testing.assert_array_equal(kv[:, 0], ours.keys[:, 0])
    np.testing.assert_array_equal(kv[:, 1], ours.values[:, 0])


def test_racing_commits_of_one_trajectory_one_wins(s3_env, monkeypatch):
    """Two writers that both wrote their data race to commit trajectory t0: exactly one marker is
    created, the other writer gets a clear error, and only the winner's data is left."""
    url = f"s3://{s3_env}/stores/race"
    both_staged = threading.Barrier(2, timeout=60)
    real_commit = MarkerCommit.commit

    def commit_together(self, staging, final_prefix, attributes, durable=None):
        if final_prefix.endswith("trajectories/t0/"):
            both_staged.wait()  # neither commits before both wrote their arrays
        real_commit(self, staging, final_prefix, attributes, durable)

    monkeypatch.setattr(MarkerCommit, "commit", commit_together)
    stores = [SnapshotStore.open(url, codec="lossless") for _ in range(2)]
    states = [synthetic_state(n, length=LENGTH) for n in (1, 2)]
    for store, state in zip(stores, states, strict=True):
        store.spill("r", "t0", state, PROMPT_LEN)

    def flush(store: SnapshotStore) -> BaseException | None:
        try:
            store.close()
        except StoreError as err:
            return err
        return None

    with ThreadPoolExecutor(2) as pool:
        errors = list(pool.map(flush, stores))
    (loser,) = [n for n, err in enumerate(errors) if err is not None]
    assert "runs/r/trajectories/t0/ already exists in the store (committed by another writer)" in str(errors[loser])
    with SnapshotStore.open(url, mode="r") as store:
        np.testing.assert_array_equal(store.read_prefix("r", "t0", LENGTH).keys, states[1 - loser].keys)
    assert len(_attempts(s3_env, "stores/race/runs/r/trajectories/t0/")) == 1  # the loser's data is gone


_CRASH_BEFORE_MARKER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from _store_worker import PROMPT_LEN, synthetic_state
    from vinekv.kvstore import SnapshotStore
    from vinekv.kvstore.backends.marker import MarkerCommit

    real_create = MarkerCommit._create

    def create(self, key, value):
        if key.endswith("trajectories/t1/zarr.json"):
            os._exit(9)  # killed after t1's arrays were written, before its marker
        return real_create(self, key, value)

    MarkerCommit._create = create
    store = SnapshotStore.open({url!r}, codec="int8")
    for n in range(2):
        store.spill("r", f"t{{n}}", synthetic_state(n, length={length}), PROMPT_LEN)
        store.flush()
    """
)


def test_a_crash_between_data_and_marker_stays_invisible_and_is_swept(s3_env):
    url = f"s3://{s3_env}/stores/crash"
    script = _CRASH_BEFORE_MARKER.format(tests=os.path.dirname(__file__), url=url, length=LENGTH)
    assert subprocess.run([sys.executable, "-c", script], capture_output=True).returncode == 9
    node = "stores/crash/runs/r/trajectories/t1/"
    (attempt,) = _attempts(s3_env, node)
    assert f"{node}{attempt}/q/zarr.json" in _keys(s3_env, node)  # t1's data is there, unmarked
    with SnapshotStore.open(url, mode="r") as store:
        assert store.trajectories("r") == ["t0"] and store.verify() == []
    with SnapshotStore.open(url, mode="r+") as store:  # an open for writing keeps young attempts
        assert _attempts(s3_env, node) == {attempt}
    assert main(["gc", url, "--grace", "0"]) == 0
    assert _keys(s3_env, node) == []
    with SnapshotStore.open(url, mode="r+") as store:
        assert store.trajectories("r") == ["t0"] and store.verify() == []
        store.spill("r", "t1", synthetic_state(1, length=LENGTH), PROMPT_LEN)  # the id is free again
        store.flush()
        assert store.trajectories("r") == ["t0", "t1"]


def test_an_interrupted_run_deletion_is_gone_and_its_remains_are_removed(s3_env, monkeypatch):
    url = f"s3://{s3_env}/stores/del"
    with SnapshotStore.open(url, codec="int8") as store:
        for n in range(2):
            store.spill("r", f"t{n}", synthetic_state(n, length=LENGTH), PROMPT_LEN)
        store.flush()

        def crash(prefix):
            raise OSError("killed while deleting")

        monkeypatch.setattr(store._backend, "delete_prefix", crash)
        with pytest.raises(OSError, match="killed while deleting"):
            store.delete_run("r")
    assert _keys(s3_env, "stores/del/runs/r/trajectories/t1/")  # the remains are still stored
    with SnapshotStore.open(url, mode="r+") as store:  # opening for writing removes them
        assert store.runs() == []
        assert _keys(s3_env, "stores/del/runs/r/trajectories/") == ["stores/del/runs/r/trajectories/zarr.json"]
        store.spill("r", "t5", synthetic_state(5, length=LENGTH), PROMPT_LEN)
        store.flush()
        assert store.trajectories("r") == ["t5"] and store.verify() == []


def test_concurrent_annotations_lose_no_update(s3_env):
    """Two writers annotate one trajectory 12 times each: compare-and-swap keeps every field."""
    url = f"s3://{s3_env}/stores/cas"
    with SnapshotStore.open(url, codec="int8") as store:
        store.spill("r", "t0", synthetic_state(0, length=LENGTH), PROMPT_LEN, reward=1.0)

    def annotate(writer: int) -> None:
        with SnapshotStore.open(url, mode="r+") as store:
            for i in range(12):
                store.annotate("r", "t0", **{f"w{writer}_{i}": i})

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(annotate, range(2)))
    with SnapshotStore.open(url, mode="r") as store:
        fields = store.trajectory_info("r", "t0")["fields"]
    assert fields == {"reward": 1.0, **{f"w{w}_{i}": i for w in range(2) for i in range(12)}}
