"""The store on S3 through TensorStore's s3 driver, against a real S3-compatible server (moto's
server mode) started on 127.0.0.1 by the tests: round trips, integrity, clear errors for a
missing bucket and a wrong endpoint."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from _store_worker import PROMPT_LEN, synthetic_state

from kvstore import SnapshotStore, StoreError
from kvstore import tensorstore_backend as backend

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
    keys = boto3.client("s3").list_objects_v2(Bucket=s3_env, Prefix="stores/a/runs/r/prompts/")["Contents"]
    assert len({k["Key"].split("/")[5] for k in keys} - {"zarr.json"}) == 1  # one prompt node, shared


def test_damage_on_s3_is_named(s3_env):
    url = f"s3://{s3_env}/stores/b"
    with SnapshotStore.open(url, codec="int8") as store:
        store.spill("r", "t0", synthetic_state(0, length=LENGTH), PROMPT_LEN)
    s3 = boto3.client("s3")
    s3.delete_object(Bucket=s3_env, Key="stores/b/runs/r/trajectories/t0/q/zarr.json")
    with SnapshotStore.open(url, mode="r") as store:
        (problem,) = store.verify()
    assert (
        problem.message
        == f"s3://{s3_env}/stores/b/runs/r/trajectories/t0/q/zarr.json is missing (array metadata of a committed node)"
    )


def test_a_missing_bucket_and_a_wrong_endpoint_are_clear_errors(s3_env, monkeypatch):
    with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1"):
        SnapshotStore.open("s3://no-such-bucket/x", codec="int8")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.setattr(backend, "OBJECT_STORE_TIMEOUT_S", 2.0)
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
    kv = np.concatenate(
        [node["q"][:] * node["scale"][:][..., None].astype(np.float32) for node in (prompt, traj)], axis=2
    )
    np.testing.assert_array_equal(kv[:, 0], ours.keys[:, 0])
    np.testing.assert_array_equal(kv[:, 1], ours.values[:, 0])
