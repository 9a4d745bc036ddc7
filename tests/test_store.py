"""SnapshotStore: round trips through a real model, zarr-python readability, crash safety, integrity."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _store_worker import PROMPT_LEN, synthetic_state
from conftest import no_cache_logits

from vinekv.kvstore import (
    CachedState,
    CorruptChunkError,
    MissingEntryError,
    SnapshotStore,
    StalePolicyError,
    StoreError,
    StoreFormatError,
    capture_state,
    resume_from_state,
)
from vinekv.kvstore.codecs.int8 import QMAX
from vinekv.models import build_model

REPO = Path(__file__).resolve().parent.parent
PLEN = 20  # prompt tokens of the model trajectories
T = 36  # trajectory length (prompt + response); token_seq has 4 more tokens to resume with


@pytest.fixture(scope="module")
def trajectories(tiny_model, token_seq):
    """Two full trajectories of the tiny model sharing one prompt, plus one with another prompt."""
    seqs = np.stack([token_seq[0], np.concatenate([token_seq[0, :PLEN], token_seq[1, PLEN:]]), token_seq[1]])
    return seqs, [capture_state(tiny_model, seqs[i : i + 1, :T], T) for i in range(3)]


def _spill_all(store, states, run="r0"):
    for i, state in enumerate(states):
        store.spill(run, f"t{i}", state, PLEN, reward=float(i), steps=[PLEN, PLEN + 7], gold=np.int64(42))
    store.flush()


@pytest.mark.parametrize("where", ["disk", "memory"])
def test_lossless_round_trip_resumes_exactly(tiny_model, trajectories, tmp_path, where):
    seqs, states = trajectories
    location = tmp_path / "store" if where == "disk" else f"memory://{tmp_path.name}/"
    with SnapshotStore.open(location, codec="lossless") as store:
        _spill_all(store, states)
        assert store.trajectories("r0") == ["t0", "t1", "t2"]
        info = store.trajectory_info("r0", "t1")
        assert info["fields"] == {"reward": 1.0, "steps": [PLEN, PLEN + 7], "gold": 42}
        for i in range(3):
            for t in (7, PLEN, PLEN + 9, T):  # inside the prompt, its end, inside the response, all
                state = store.read_prefix("r0", f"t{i}", t, model=tiny_model)
                np.testing.assert_array_equal(state.keys, states[i].keys[:, :, :t])
                np.testing.assert_array_equal(state.values, states[i].values[:, :, :t])
                np.testing.assert_array_equal(state.token_ids, seqs[i : i + 1, :t])
                logits, _ = resume_from_state(tiny_model, state, seqs[i : i + 1, t : t + 3], check_policy=True)
                expected = no_cache_logits(tiny_model, seqs[i : i + 1, : t + 3])[:, t:]
                np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5, rtol=0)


def test_int8_round_trip_within_documented_bounds(tiny_model, trajectories, tmp_path):
    """Element error <= scale/2 + absmax * 2^-10 (float16 scale); next-token KL < 1e-5 nats."""
    seqs, states = trajectories
    with SnapshotStore.open(tmp_path / "s", codec="int8") as store:
        _spill_all(store, states)
        for i in range(3):
            for t in (PLEN, T - 1):
                got = store.read_prefix("r0", f"t{i}", t, model=tiny_model)
                for exact, decoded in ((states[i].keys, got.keys), (states[i].values, got.values)):
                    exact = exact[:, :, :t].astype(np.float32)
                    absmax = np.abs(exact).max(-1, keepdims=True)
                    bound = 0.5 * absmax / QMAX * (1 + 2**-10) + absmax * 2**-10
                    assert (np.abs(decoded - exact) <= bound + 1e-12).all()
                ref, _ = resume_from_state(tiny_model, states[i].prefix(t), seqs[i : i + 1, t : t + 1])
                lossy, _ = resume_from_state(tiny_model, got, seqs[i : i + 1, t : t + 1])
                p, q = jax.nn.log_softmax(ref[0, -1]), jax.nn.log_softmax(lossy[0, -1])
                assert float((np.exp(p) * (p - q)).sum()) < 1e-5
        size = store.size("r0")
        assert size.raw == (2 * T - PLEN + T) * 2 * 2 * 2 * 16 * 4  # two prompts + three responses, f32
        assert size.ratio > 1.5  # int8 vs float32; at 36 tokens JSON metadata dominates (sizes: docs/benchmarks.md)


def test_prompt_stored_once_and_batched_reads(trajectories, tmp_path):
    _, states = trajectories
    with SnapshotStore.open(tmp_path / "s", codec="lossless") as store:
        _spill_all(store, states)
        prompts = sorted(p.name for p in (tmp_path / "s/runs/r0/prompts").iterdir() if p.is_dir())
        assert len(prompts) == 2  # t0 and t1 share their prompt
        requests = [("r0", "t0", 5), ("r0", "t2", T), ("r0", "t1", PLEN + 1)]
        batched = store.read_prefixes(requests)
        for (run, tid, t), state in zip(requests, batched, strict=True):
            single = store.read_prefix(run, tid, t)
            np.testing.assert_array_equal(state.keys, single.keys)
            assert state.position == t


ZARR_READER = r"""
import json, sys
import numpy as np, zarr
g = zarr.open_group(sys.argv[1], mode="r")
root = g.attrs["vinekv"]
out = {}
for run in g["runs"].group_keys():
    for tid in g["runs"][run]["trajectories"].group_keys():
        node = g["runs"][run]["trajectories"][tid]
        info = node.attrs["vinekv"]
        prompt = g["runs"][run]["prompts"][info["prompt"]]
        parts = []
        for part in (prompt, node):
            if info["codec"]["name"] == "int8":  # kv = q * scale, per the codec's decode sentence
                parts.append(part["q"][:].astype(np.float32) * part["scale"][:].astype(np.float32)[..., None])
            else:
                parts.append(part["kv"][:])
        out[f"{run}/{tid}"] = np.concatenate(parts, axis=2)
np.savez(sys.argv[2], **out)
print(json.dumps({"format": root["format"], "keys": sorted(out)}))
"""


@pytest.mark.parametrize("codec", ["lossless", "int8"])
def test_zarr_python_reads_the_store_without_vinekv(trajectories, tmp_path, codec):
    _, states = trajectories
    with SnapshotStore.open(tmp_path / "s", codec=codec) as store:
        _spill_all(store, states)
        ours = {f"r0/t{i}": store.read_prefix("r0", f"t{i}", T) for i in range(3)}
    out = subprocess.run(
        [sys.executable, "-I", "-c", ZARR_READER, str(tmp_path / "s"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary == {"format": "vinekv.kvstore", "keys": ["r0/t0", "r0/t1", "r0/t2"]}
    theirs = np.load(tmp_path / "out.npz")
    for key, state in ours.items():
        np.testing.assert_array_equal(theirs[key][:, 0], state.keys[:, 0])
        np.testing.assert_array_equal(theirs[key][:, 1], state.values[:, 0])


def _kill_worker_mid_spill(path: Path, delay: float, durability: str) -> int:
    """Runs the spilling worker, SIGKILLs it ``delay`` s after its 4th commit; returns commits seen."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    worker = [sys.executable, str(REPO / "tests/_store_worker.py"), str(path), durability]
    proc = subprocess.Popen(worker, stdout=subprocess.PIPE, text=True, env=env)
    try:
        committed = -1
        while committed < 3:
            line = proc.stdout.readline()
            assert line, "worker exited early"
            committed = int(line.split()[1])
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return committed + 1


@pytest.mark.parametrize("durability", ["trajectory", "flush"])
def test_process_killed_mid_spill_leaves_committed_trajectories_intact(tmp_path, durability):
    """SIGKILL at staggered times: every trajectory committed before the kill is readable and exact,
    any other visible one is complete, and staging leftovers are cleared on the next open. With
    group commit (``flush``) a kill between flushes loses only the trajectories since the last."""
    hit_mid_write = False
    for attempt, delay in enumerate([0.012, 0.016, 0.02, 0.008, 0.024, 0.03, 0.004, 0.036, 0.044, 0.05, 0.06]):
        path = tmp_path / f"s{attempt}"
        committed = _kill_worker_mid_spill(path, delay, durability)
        half_written = [p for p in (path / ".staging").iterdir() if p.is_dir() and any(p.rglob("*"))]
        with SnapshotStore.open(path, mode="a") as store:  # opening for writing clears stale staging data
            ids = store.trajectories("run0")
            assert set(ids) >= {f"traj{n:04d}" for n in range(committed)}
            if durability == "trajectory":
                assert ids == [f"traj{n:04d}" for n in range(len(ids))]  # no gap: one commit per spill
            for tid in ids:
                n = int(tid[4:])
                expected = synthetic_state(n)
                got = store.read_prefix("run0", tid, expected.position)
                np.testing.assert_array_equal(got.keys, expected.keys)
                np.testing.assert_array_equal(got.values, expected.values)
                assert store.trajectory_info("run0", tid)["fields"] == {"reward": float(n)}
        assert not [p for p in (path / ".staging").iterdir() if p.is_dir()]
        if half_written:
            hit_mid_write = True
            break
    assert hit_mid_write, "no kill landed inside a write; the test did not exercise a torn spill"


def test_corrupt_chunk_is_reported_with_its_positions(tmp_path):
    state = synthetic_state(1, length=400)
    with SnapshotStore.open(tmp_path / "s", codec="lossless", chunk_tokens=64) as store:
        store.spill("run0", "a", state, PROMPT_LEN)
        store.flush()
    shard = next(p for p in (tmp_path / "s/runs/run0/trajectories/a/kv/c").rglob("*") if p.is_file())
    data = bytearray(shard.read_bytes())
    # 384 response tokens = 6 inner chunks of 64; the shard index at the end holds (offset, nbytes)
    # per chunk as little-endian uint64, then its crc32c.
    index = np.frombuffer(bytes(data[-(6 * 16 + 4) : -4]), dtype="<u8").reshape(6, 2)
    data[int(index[3, 0]) + 10] ^= 0xFF  # inside the 4th inner chunk: response tokens [192, 256)
    shard.write_bytes(bytes(data))
    with SnapshotStore.open(tmp_path / "s", mode="r") as store:
        ok = store.read_prefix("run0", "a", PROMPT_LEN + 128)  # chunks before the damage still read
        np.testing.assert_array_equal(ok.keys, state.keys[:, :, : PROMPT_LEN + 128])
        with pytest.raises(CorruptChunkError, match=r"run 'run0' trajectory 'a'.*positions \[2\d\d, 2\d\d\)") as err:
            store.read_prefix("run0", "a", 400)
        assert "[208, 272)" in str(err.value)  # response chunk 3 = trajectory positions 16+192 .. 16+256


def test_bad_input_errors(tiny_model, trajectories, tmp_path):
    _, states = trajectories
    with SnapshotStore.open(tmp_path / "s", codec="lossless") as store:
        _spill_all(store, states[:1])
        with pytest.raises(MissingEntryError, match=r"no run 'nope' in the store \(runs: \['r0'\]\)"):
            store.trajectories("nope")
        with pytest.raises(MissingEntryError, match="no trajectory 'zz' in run 'r0'"):
            store.read_prefix("r0", "zz", 3)
        with pytest.raises(ValueError, match=r"t=37 outside \[1, 36\]"):
            store.read_prefix("r0", "t0", T + 1)
        with pytest.raises(ValueError, match=r"t=0 outside \[1, 36\]"):
            store.read_prefix("r0", "t0", 0)
        other = dataclasses.replace(
            states[0],
            keys=states[0].keys[:, :, :, :1],
            values=states[0].values[:, :, :, :1],
            layout=dataclasses.replace(states[0].layout, num_kv_heads=1),
        )
        with pytest.raises(ValueError, match=r"snapshot layout does not match the store's.*num_kv_heads': \(1, 2\)"):
            store.spill("r0", "t9", other, PLEN)
        with pytest.raises(FileExistsError, match="trajectory 't0' of run 'r0' is already in the store"):
            store.spill("r0", "t0", states[0], PLEN)
        with pytest.raises(ValueError, match=r"prompt_len 37 outside \[1, 36\]"):
            store.spill("r0", "t5", states[0], T + 1)
        with pytest.raises(ValueError, match="spill takes one trajectory"):
            store.spill(
                "r0",
                "t5",
                CachedState(
                    *(np.concatenate([a, a], 1) for a in (states[0].keys, states[0].values)),
                    np.concatenate([states[0].token_ids] * 2),
                    states[0].layout,
                    "x",
                ),
                PLEN,
            )
        with pytest.raises(TypeError, match="not JSON-serialisable"):
            store.spill("r0", "t5", states[0], PLEN, reward=object())
        for bad in ("../x", "x\n", "a b", ".hidden", "x" * 129):
            with pytest.raises(ValueError, match=r"breaks the naming rule: 1-128 characters"):
                store.spill(bad, "t5", states[0], PLEN)
        with pytest.raises(ValueError, match="trajectory_id 'zarr.json' is reserved"):
            store.spill("r0", "zarr.json", states[0], PLEN)
        with pytest.raises(TypeError, match="trajectory_id must be a str or an int, got float"):
            store.spill("r0", 2.5, states[0], PLEN)
        with pytest.raises(TypeError, match="prompt_len must be an int, got 2.7"):
            store.spill("r0", "t5", states[0], 2.7)
        with pytest.raises(ValueError, match=r"field names \['mc'\] are reserved"):
            store.spill("r0", "t5", states[0], PLEN, mc={"mean": [1.0]})
        # a stale policy is refused unless allowed
        stale_model = build_model("llama", seed=5)
        with pytest.raises(StalePolicyError, match="pass allow_stale=True"):
            store.read_prefix("r0", "t0", 5, model=stale_model)
        assert store.read_prefix("r0", "t0", 5, model=stale_model, allow_stale=True).position == 5
        assert store.trajectories("r0") == ["t0"]  # nothing refused above was written
    closed_calls = [
        lambda: store.annotate("r0", "t0", x=1),  # a closed store no longer holds the writer lock
        lambda: store.delete_run("r0"),
        lambda: store.spill("r0", "t9", states[0], PLEN),
        lambda: store.read_prefix("r0", "t0", 5),
        lambda: store.plan_read("r0", "t0", 5),
        lambda: store.trajectory_info("r0", "t0"),
        lambda: store.token_ids("r0", "t0"),
        lambda: store.trajectories("r0"),
        store.runs,
        lambda: store.size("r0"),
        store.flush,
        store.verify,
    ]
    for call in closed_calls:
        with pytest.raises(RuntimeError, match="is closed: open it again to use it"):
            call()
    # unknown format version; not a vinekv store; a file; an unwritable location
    root = json.loads((tmp_path / "s/zarr.json").read_text())
    root["attributes"]["vinekv"]["format_version"] = 99
    (tmp_path / "s/zarr.json").write_text(json.dumps(root))
    with pytest.raises(StoreFormatError, match="format version 99; this vinekv reads version 2"):
        SnapshotStore.open(tmp_path / "s", mode="r")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain/data.csv").write_text("1,2\n")
    with pytest.raises(StoreFormatError, match="non-empty directory without zarr.json"):
        SnapshotStore.open(tmp_path / "plain")
    (tmp_path / "z").mkdir()
    (tmp_path / "z/zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.raises(StoreFormatError, match="not a vinekv store"):
        SnapshotStore.open(tmp_path / "z")
    with pytest.raises(StoreFormatError, match="is a file"):
        SnapshotStore.open(tmp_path / "plain/data.csv")
    for mode in ("r", "r+"):  # `vinekv gc` opens with "r+": a mistyped path is refused, not created
        with pytest.raises(StoreFormatError, match=f"no vinekv store at .*missing \\(mode '{re.escape(mode)}'"):
            SnapshotStore.open(tmp_path / "missing", mode=mode)
        assert not (tmp_path / "missing").exists()
    with pytest.raises(OSError, match="cannot create the store"):
        SnapshotStore.open(tmp_path / "plain/data.csv/sub")


def test_write_error_surfaces_and_committed_data_stays(trajectories, tmp_path, monkeypatch):
    """A failing disk (ENOSPC mid-write) is raised on flush; earlier trajectories stay readable."""
    _, states = trajectories
    store = SnapshotStore.open(tmp_path / "s", codec="lossless")
    _spill_all(store, states[:2])
    real_write = store._backend.write_array

    def full_disk(path, *args, **kwargs):
        if "/trajectories/" in path or path.startswith(".staging"):
            raise OSError(28, "No space left on device")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(store._backend, "write_array", full_disk)
    store.spill("r0", "t9", states[2], PLEN)
    with pytest.raises(StoreError, match="No space left on device"):
        store.flush()
    store.flush()  # reported once; the store stays usable
    monkeypatch.setattr(store._backend, "write_array", real_write)
    store.close()
    with SnapshotStore.open(tmp_path / "s", mode="r") as reader:
        assert reader.trajectories("r0") == ["t0", "t1"]
        np.testing.assert_array_equal(reader.read_prefix("r0", "t1", T).keys, states[1].keys)
    assert not [p for p in (tmp_path / "s/.staging").iterdir() if p.is_dir()]


def test_write_error_surfaces_on_the_next_spill(trajectories, tmp_path, monkeypatch):
    _, states = trajectories
    store = SnapshotStore.open(tmp_path / "s", codec="lossless")

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store._backend, "write_array", broken)
    store.spill("r1", "a", states[0], PLEN)
    time.sleep(0.3)
    with pytest.raises(StoreError, match="trajectory 'a' of run 'r1': .*Input/output error"):
        store.spill("r1", "b", states[1], PLEN)
    store.close()


def test_size_and_delete_run(trajectories, tmp_path):
    _, states = trajectories
    with SnapshotStore.open(tmp_path / "s", codec="int8") as store:
        _spill_all(store, states, run="a")
        _spill_all(store, states[:1], run="b")
        assert store.runs() == ["a", "b"]
        size = store.size("b")
        assert size.raw == T * 2 * 2 * 2 * 16 * 4 and 0 < size.stored < size.raw
        store.delete_run("a")
        assert store.runs() == ["b"]
        with pytest.raises(MissingEntryError):
            store.read_prefix("a", "t0", 3)
        assert store.read_prefix("b", "t0", T).position == T


def test_group_commit_makes_trajectories_visible_only_at_flush(tmp_path):
    with SnapshotStore.open(tmp_path / "s", codec="int8", durability="flush") as store:
        for n in range(3):
            store.spill("run0", f"t{n}", synthetic_state(n, length=100), PROMPT_LEN)
        store._writer.queue.drain()  # written and staged, not committed
        with SnapshotStore.open(tmp_path / "s", mode="r") as reader:
            assert reader.trajectories("run0") == []
        store.flush()
        with SnapshotStore.open(tmp_path / "s", mode="r") as reader:
            assert reader.trajectories("run0") == ["t0", "t1", "t2"]
            np.testing.assert_array_equal(
                reader.read_prefix("run0", "t1", 100).token_ids, synthetic_state(1, 100).token_ids
            )
        with pytest.raises(FileExistsError, match="'t1' of run 'run0' is already in the store"):
            store.spill("run0", "t1", synthetic_state(1, length=100), PROMPT_LEN)
    assert not [p for p in (tmp_path / "s/.staging").iterdir() if p.is_dir()]
    with pytest.raises(ValueError, match="durability must be one of"):
        SnapshotStore.open(tmp_path / "s", durability="eventually")
    with pytest.raises(ValueError, match="durability='flush' needs a local store"):
        SnapshotStore.open(f"memory://{tmp_path.name}/", durability="flush")


def _file_bytes_read() -> int:
    import tensorstore as ts

    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(m["values"][0]["value"] for m in metrics if m["values"])


def test_chunk_cache_reads_shared_chunks_from_disk_once(tmp_path):
    with SnapshotStore.open(tmp_path / "s", codec="int8", chunk_tokens=64) as store:
        for n in range(3):
            store.spill("r", f"t{n}", synthetic_state(n, length=300), PROMPT_LEN)
    read = {}
    for cache_bytes in (0, 2**26):
        with SnapshotStore.open(tmp_path / "s", mode="r", cache_bytes=cache_bytes) as store:
            store.read_prefix("r", "t0", 200)
            before = _file_bytes_read()
            store.read_prefix("r", "t0", 200)  # the same chunks again
            again = _file_bytes_read() - before
            store.read_prefix("r", "t1", PROMPT_LEN)  # only the prompt, shared with t0
            prompt = _file_bytes_read() - before - again
            got = store.read_prefix("r", "t1", 150).keys
            read[cache_bytes] = (again, prompt)
            np.testing.assert_array_equal(got, store.read_prefixes([("r", "t1", 150)])[0].keys)
    node_json = (tmp_path / "s/runs/r/trajectories/t1/zarr.json").stat().st_size
    run_json = (tmp_path / "s/runs/r/zarr.json").stat().st_size  # read once per call: the run's generation
    assert read[0][0] > run_json and read[0][1] > node_json + run_json  # without a cache every read goes to disk
    assert read[2**26] == (run_json, node_json + run_json)  # with one, metadata only: no chunk is read twice


@pytest.mark.parametrize("durability", ["trajectory", "flush"])
def test_prompt_only_trajectory_is_stored_and_read_back(tmp_path, durability):
    """prompt_len == length (valuing the prompt itself): an empty response node, committed."""
    state = synthetic_state(3, length=PROMPT_LEN)
    with SnapshotStore.open(tmp_path / "s", codec="int8", durability=durability) as store:
        store.spill("r", "p", state, PROMPT_LEN, reward=1.0)
        store.flush()
        assert store.trajectories("r") == ["p"] and store.trajectory_info("r", "p")["response_token_ids"] == []
        got = store.read_prefix("r", "p", PROMPT_LEN)
        np.testing.assert_array_equal(got.token_ids, state.token_ids)
        assert np.abs(got.keys - state.keys).max() <= np.abs(state.keys).max() / 127


def test_a_run_deleted_and_written_again_reads_the_new_data(tmp_path):
    """The chunk cache must not serve a deleted run's chunks under the same names."""
    with SnapshotStore.open(tmp_path / "s", codec="lossless", cache_bytes=2**26) as store:
        for length, n in ((200, 1), (200, 2), (150, 3)):  # same length (same chunk keys), then another
            store.spill("r", "t0", synthetic_state(n, length=length), PROMPT_LEN)
            store.flush()
            got = store.read_prefix("r", "t0", length)
            np.testing.assert_array_equal(got.keys, synthetic_state(n, length=length).keys)
            store.delete_run("r")


def test_failed_group_commit_leaves_a_consistent_store(tmp_path, monkeypatch):
    """An fsync error commits nothing of the batch and the ids can be spilled again; a prompt
    that fails to commit takes the trajectories that use it with it (no dangling reference)."""
    from vinekv.kvstore.backends import rename as tensorstore_backend

    store = SnapshotStore.open(tmp_path / "s", codec="int8", durability="flush")
    real_fsync = tensorstore_backend._fsync_path
    calls = {"n": 0}

    def failing_fsync(path):
        if ".staging" in str(path) and "/q" in str(path):  # the group commit's fsync round (int8 arrays)
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(5, "Input/output error")
        real_fsync(path)

    monkeypatch.setattr(tensorstore_backend, "_fsync_path", failing_fsync)
    store.spill("r", "t0", synthetic_state(0, length=100), PROMPT_LEN)
    with pytest.raises(OSError, match="Input/output error"):
        store.flush()
    staged_files = [p for p in (tmp_path / "s/.staging").rglob("*") if p.is_file() and p.parent.name != ".staging"]
    assert store.trajectories("r") == [] and not staged_files
    store.spill("r", "t0", synthetic_state(0, length=100), PROMPT_LEN)  # not "already in the store"
    store.spill("r", "t1", synthetic_state(1, length=100), PROMPT_LEN)  # same prompt: it must be written again
    store.flush()
    assert store.trajectories("r") == ["t0", "t1"]
    np.testing.assert_array_equal(store.read_prefix("r", "t1", 100).token_ids, synthetic_state(1, 100).token_ids)

    real_rename = store._backend._rename

    def prompt_rename_fails(staging, final):
        if "/prompts/" in final:
            raise OSError(28, "No space left on device")
        real_rename(staging, final)

    monkeypatch.setattr(store._backend, "_rename", prompt_rename_fails)
    other = synthetic_state(2, length=100)
    other.token_ids[0, :PROMPT_LEN] += 1  # another prompt
    store.spill("q", "t0", other, PROMPT_LEN)
    with pytest.raises(StoreError, match="group commit of runs/q/prompts/.* failed: .*No space left.*and 1 more"):
        store.flush()
    assert store.trajectories("q") == []  # the trajectory was not committed without its prompt
    store.close()


def test_trajectory_info_sees_another_writers_annotation(tmp_path):
    """A handle that read a trajectory before another process annotated it returns the new
    fields (the async trainer reads the values its replay worker wrote)."""
    path = tmp_path / "s"
    with SnapshotStore.open(path, codec="int8") as store:
        store.spill("r", "t0", synthetic_state(0, length=100), PROMPT_LEN, reward=1.0)
        store.flush()
        assert store.trajectory_info("r", "t0")["fields"] == {"reward": 1.0}
        assert store.size("r").stored > 0  # reads every node's attributes too
        with SnapshotStore.open(path, mode="r+") as other:
            other.annotate("r", "t0", note="valued")
        assert store.trajectory_info("r", "t0")["fields"] == {"reward": 1.0, "note": "valued"}
        assert store.read_prefix("r", "t0", 50).position == 50
