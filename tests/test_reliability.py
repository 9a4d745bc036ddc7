"""Integrity and crash safety of the store beyond spills: each defect of the reliability issue,
reproduced and refused (missing shards, edited metadata, prompts that only look alike, deletes
and creations cut short, racing writers, a full disk)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _store_worker import PROMPT_LEN, synthetic_state

from vinekv.kvstore import CachedState, SnapshotStore
from vinekv.kvstore.errors import CorruptChunkError, CorruptMetadataError, StoreFormatError
from vinekv.kvstore.integrity import seal

REPO = Path(__file__).resolve().parent.parent
LENGTH = 150  # 3 chunks of 64 tokens


def _store(path: Path, codec: str = "int8", n: int = 2) -> Path:
    with SnapshotStore.open(path, codec=codec) as store:
        for i in range(n):
            store.spill("r", f"t{i}", synthetic_state(i, length=LENGTH), PROMPT_LEN, reward=float(i))
    return path


def _read_all(path: Path) -> None:
    with SnapshotStore.open(path, mode="r") as store:
        for tid in store.trajectories("r"):
            store.trajectory_info("r", tid)
            store.read_prefix("r", tid, LENGTH)


@pytest.mark.parametrize(
    ("codec", "array"), [("lossless", "kv"), ("int8", "q"), ("int8", "scale"), ("int4", "key_params")]
)
@pytest.mark.parametrize("node", ["trajectories/t1", "prompts/*"])
def test_a_missing_shard_is_an_error_naming_the_file(tmp_path, codec, array, node):
    """Zarr reads an absent chunk as its fill value (zeros); the store refuses it instead."""
    path = _store(tmp_path / "s", codec)
    folder = next((path / "runs/r").glob(f"{node}/{array}"))
    (shard,) = [f for f in (folder / "c").rglob("*") if f.is_file()]  # one shard per array
    shard.unlink()
    with SnapshotStore.open(path, mode="r") as store, pytest.raises(CorruptChunkError) as err:
        store.read_prefix("r", "t1", LENGTH if node.startswith("traj") else 5)
    assert f"stored array {folder} has missing chunks" in str(err.value)


@pytest.mark.parametrize(
    ("edit", "file"),
    [
        (lambda a: a["attributes"]["vinekv"]["response_token_ids"].__setitem__(3, 7), "trajectories/t1/zarr.json"),
        (lambda a: a["attributes"]["vinekv"]["fields"].__setitem__("reward", 9.0), "trajectories/t1/zarr.json"),
        (lambda a: a["attributes"]["vinekv"]["token_ids"].__setitem__(0, 5), "prompts/*/zarr.json"),
        (lambda a: a.__setitem__("data_type", "int16"), "trajectories/t1/q/zarr.json"),
        (lambda a: a["shape"].__setitem__(2, 140), "trajectories/t1/scale/zarr.json"),
        (lambda a: a["attributes"]["vinekv"].__setitem__("kind", "archive"), "zarr.json"),
    ],
)
def test_edited_metadata_is_refused_naming_the_file(tmp_path, edit, file):
    path = _store(tmp_path / "s")
    target = path / file if file == "zarr.json" else next((path / "runs/r").glob(file))
    node = json.loads(target.read_text())
    edit(node)
    target.write_text(json.dumps(node))
    with pytest.raises(CorruptMetadataError, match=str(target).replace("*", r"\*") + ".*(digest|altered)"):
        _read_all(path)


@pytest.mark.parametrize(
    "file",
    [
        "zarr.json",
        "runs/zarr.json",
        "runs/r/zarr.json",
        "runs/r/trajectories/zarr.json",
        "runs/r/trajectories/t0/zarr.json",
        "runs/r/trajectories/t0/q/zarr.json",
    ],
)
def test_a_flipped_byte_in_any_json_names_the_file(tmp_path, file):
    path = _store(tmp_path / "s")
    data = bytearray((path / file).read_bytes())
    data[len(data) // 2] = 0xFF
    (path / file).write_bytes(bytes(data))
    with pytest.raises(CorruptMetadataError, match=f"{path / file}: not valid JSON"):
        _read_all(path)


def test_deleted_node_metadata_is_refused(tmp_path):
    path = _store(tmp_path / "s")
    (path / "runs/r/trajectories/t1/zarr.json").unlink()
    with (
        SnapshotStore.open(path, mode="r") as store,
        pytest.raises(CorruptMetadataError, match="t1/zarr.json is missing"),
    ):
        store.trajectories("r")
    path = _store(tmp_path / "s2")
    next((path / "runs/r/prompts").glob("*/zarr.json")).unlink()
    with SnapshotStore.open(path, mode="r") as store, pytest.raises(CorruptMetadataError, match="is missing"):
        store.read_prefix("r", "t0", 5)


def test_prompts_that_differ_only_in_kv_are_stored_apart(tmp_path):
    """Same prompt tokens and fingerprint, other KV (dtype, codec numerics): each trajectory reads
    back its own prompt KV; equal KV is stored once."""
    a = synthetic_state(0, length=LENGTH)
    b = CachedState(a.keys.copy(), a.values.copy(), a.token_ids, a.layout, a.fingerprint)
    b.keys[:, :, :, :PROMPT_LEN] += np.float32(0.5)
    c = synthetic_state(1, length=LENGTH)  # same prompt KV as a
    with SnapshotStore.open(tmp_path / "s", codec="lossless") as store:
        for tid, state in (("a", a), ("b", b), ("c", c)):
            store.spill("r", tid, state, PROMPT_LEN)
        store.flush()
        assert len(list((tmp_path / "s/runs/r/prompts").iterdir())) - 1 == 2  # minus prompts/zarr.json
        for tid, state in (("a", a), ("b", b), ("c", c)):
            np.testing.assert_array_equal(store.read_prefix("r", tid, LENGTH).keys, state.keys)


def test_a_delete_cut_short_never_brings_trajectories_back(tmp_path, monkeypatch):
    """delete_run renames the run away first: a crash while removing its files leaves the run
    gone, its remains are swept at the next open, and the run name starts empty."""
    path = _store(tmp_path / "s", "lossless", n=3)
    store = SnapshotStore.open(path)

    def crash(prefix):
        raise KeyboardInterrupt  # the process dies after the rename, before anything is removed

    monkeypatch.setattr(store._backend, "delete_prefix", crash)
    with pytest.raises(KeyboardInterrupt):
        store.delete_run("r")
    assert store.runs() == [] and any((path / ".staging").rglob("t2"))
    os.close(store._backend._lock_fd)  # the crashed process's lock goes with it
    with SnapshotStore.open(path, codec="lossless") as store:
        assert not any((path / ".staging").rglob("t2"))  # swept
        store.spill("r", "new", synthetic_state(7, length=LENGTH), PROMPT_LEN)
        store.flush()
        assert store.trajectories("r") == ["new"]


def test_an_interrupted_creation_is_finished_by_the_next_open(tmp_path):
    path = tmp_path / "s"
    (path / "runs").mkdir(parents=True)
    (path / "runs/zarr.json").write_bytes(b'{"half": ')  # killed while writing
    (path / "zarr.json.0a1b.tmp").write_bytes(b"")
    with pytest.raises(StoreFormatError, match="no vinekv store"):
        SnapshotStore.open(path, mode="r")
    with SnapshotStore.open(path, codec="lossless") as store:
        store.spill("r", "t0", synthetic_state(0, length=LENGTH), PROMPT_LEN)
    with SnapshotStore.open(path, mode="r") as store:
        assert store.trajectories("r") == ["t0"]
    (tmp_path / "user").mkdir()
    (tmp_path / "user/notes.txt").write_text("mine")
    with pytest.raises(StoreFormatError, match="non-empty directory without zarr.json"):
        SnapshotStore.open(tmp_path / "user")


_CREATE = """
import sys
from vinekv.kvstore import SnapshotStore
sys.stdin.readline()  # start together
try:
    with SnapshotStore.open(sys.argv[1], mode=sys.argv[2], codec=sys.argv[3]) as store:
        print("codec", store.codec.name)
except FileExistsError as err:
    print("exists", err)
"""


@pytest.mark.parametrize("mode", ["a", "w-"])
def test_racing_creators_end_with_one_usable_store(tmp_path, mode):
    for attempt in range(4):
        path = tmp_path / f"s{attempt}"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _CREATE, str(path), mode, codec],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            for codec in ("int8", "lossless")
        ]
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
        lines = sorted(o[0].strip() for o in outs)
        with SnapshotStore.open(path, mode="r") as store:
            winner = store.codec.name
        if mode == "a":  # both use the winner's store
            assert lines == [f"codec {winner}"] * 2
        else:  # one creates it, the other is told it exists
            assert lines[0] == f"codec {winner}" and lines[1].startswith("exists")


_WRITER = """
import sys
sys.path.insert(0, "tests")
from _store_worker import PROMPT_LEN, synthetic_state
from vinekv.kvstore import SnapshotStore
name, path = sys.argv[1], sys.argv[2]
with SnapshotStore.open(path, codec="int8") as store:
    for n in range(6):
        store.spill("r", f"{name}{n}", synthetic_state(n, length=100), PROMPT_LEN)
    store.flush()
    for round in range(15):
        for tid in store.trajectories("r"):
            store.annotate("r", tid, **{f"{name}_{round}": round})
"""


def test_two_writer_processes_never_corrupt_each_other(tmp_path):
    """Two processes spill into one run and annotate overlapping trajectories at once: every
    trajectory reads back, and no annotation is lost (read-modify-writes are serialised)."""
    path = tmp_path / "s"
    SnapshotStore.open(path, codec="int8").close()
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, name, str(path)], cwd=REPO, stderr=subprocess.PIPE)
        for name in ("a", "b")
    ]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    with SnapshotStore.open(path, mode="r") as store:
        ids = store.trajectories("r")
        assert sorted(ids) == sorted(f"{w}{n}" for w in "ab" for n in range(6))
        for tid in ids:
            n = int(tid[1:])
            got = store.read_prefix("r", tid, 100)
            assert np.abs(got.keys - synthetic_state(n, length=100).keys).max() < 0.05
            fields = store.trajectory_info("r", tid)["fields"]
            own = {f"{tid[0]}_{r}" for r in range(15)}  # each writer saw its own trajectories every round
            assert own <= set(fields), sorted(own - set(fields))
        assert len(list((path / "runs/r/prompts").iterdir())) - 1 == 1  # one prompt, committed once


_FULL_DISK = """
import subprocess, sys
sys.path.insert(0, "tests")
from pathlib import Path
from _store_worker import PROMPT_LEN, synthetic_state
from vinekv.kvstore import SnapshotStore
mnt, durability = sys.argv[1], sys.argv[2]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt], check=True)
store = SnapshotStore.open(mnt + "/s", codec="lossless", durability=durability)
try:
    for n in range(12):
        store.spill("r", f"t{n}", synthetic_state(n, length=300), PROMPT_LEN)
    store.close()
except Exception as err:
    print("ERROR", err)
    try:
        store.close()  # closes even when it raises the writes that failed meanwhile
    except Exception:
        pass
print("LEFT", [p.name for p in Path(mnt, "s/.staging").iterdir() if p.is_dir()])
with SnapshotStore.open(mnt + "/s", mode="r") as reader:
    for tid in reader.trajectories("r"):
        n = int(tid[1:])
        assert (reader.read_prefix("r", tid, 300).keys == synthetic_state(n, length=300).keys).all()
    print("READ", len(reader.trajectories("r")))
"""


@pytest.mark.parametrize("durability", ["trajectory", "flush"])
def test_a_full_disk_names_the_trajectory_and_leaves_no_staging(tmp_path, durability):
    """On a 3 MiB tmpfs (mounted in a user namespace): the error names the trajectory that did
    not fit, close() leaves nothing in staging, and what was committed reads back exactly."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small filesystem")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"user namespaces unavailable: {probe.stderr.decode().strip()}")
    out = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", _FULL_DISK, str(mnt), durability],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert "No space left on device" in lines["ERROR"] and "trajectory 't" in lines["ERROR"]
    assert lines["LEFT"] == "[]"
    assert 1 <= int(lines["READ"]) < 12


_SLOW_DISK = """
import sys, time
sys.path.insert(0, "tests")
from _store_worker import PROMPT_LEN, synthetic_state
from vinekv.kvstore import SnapshotStore
budget = int(sys.argv[2])
store = SnapshotStore.open(sys.argv[1], codec="lossless", max_inflight_bytes=budget, write_concurrency=2)
real_write = store._backend.write_array

def slow_write(*args, **kwargs):
    time.sleep(0.05)  # a disk slower than the producer
    return real_write(*args, **kwargs)

store._backend.write_array = slow_write

def peak_rss():  # VmHWM, bytes: the peak since exec (ru_maxrss would include the forking test runner's)
    status = open("/proc/self/status").read().splitlines()
    return 1024 * int(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

store.spill("r", "warm", synthetic_state(0), PROMPT_LEN)
store.flush()
before = peak_rss()
for n in range(1, 41):
    store.spill("r", f"t{n}", synthetic_state(n), PROMPT_LEN)  # 6 MiB of KV each
store.close()
after = peak_rss()
print(store.stats["peak_inflight_bytes"], synthetic_state(0).nbytes, after - before)
"""


def test_a_slow_disk_keeps_the_spill_queue_within_its_budget(tmp_path):
    """40 trajectories of 6 MiB into a slow disk with a 24 MiB budget: the bytes queued or in
    flight never exceed the budget, and peak memory grows by the budget plus a constant (encode
    and compression buffers, ~50 MiB here), not by the 240 MiB spilled."""
    budget = 24 * 2**20
    out = subprocess.run(
        [sys.executable, "-c", _SLOW_DISK, str(tmp_path / "s"), str(budget)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    peak, item, growth = map(int, out.stdout.split())
    assert item <= peak <= budget
    assert growth < budget + 96 * 2**20, f"peak RSS grew {growth / 2**20:.0f} MiB"


def test_vinekv_verify_names_every_damaged_file(tmp_path, capsys):
    from vinekv.cli import main

    path = _store(tmp_path / "s", "int8", n=3)
    assert main(["verify", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "ok: 3 trajectories in 1 runs intact"
    shard = next((path / "runs/r/trajectories/t1/q/c").rglob("0"))
    while shard.is_dir():
        shard = next(shard.iterdir())
    data = bytearray(shard.read_bytes())
    data[40] ^= 1
    shard.write_bytes(bytes(data))
    (path / "runs/r/trajectories/t2/scale/zarr.json").unlink()
    assert main(["verify", str(path), "--run", "r"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(
        f"DAMAGED: run 'r' trajectory 't1': stored array {path}/runs/r/trajectories/t1/q is corrupt"
    )
    assert (
        out[1]
        == f"DAMAGED: {path}/runs/r/trajectories/t2/scale/zarr.json is missing (array metadata of a committed node)"
    )
    assert out[2] == "2 damaged entries in 1 runs"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("length", 2**40, "response_token_ids must list"),
        ("length", "150", "length must be an int >= 1"),
        ("prompt_len", 0, "prompt_len must be an int >= 1"),
        ("prompt_len", 20, "prompt_len 20, but its prompt node"),
        ("response_token_ids", [1, -3], "must list 134 token ids, got 2"),
        ("fields", [], "fields an object"),
    ],
)
def test_consistently_sealed_nonsense_is_refused(tmp_path, field, value, message):
    """Metadata whose digest matches but whose values contradict each other (a writer's bug, or
    an edit re-sealed by hand): a clear error naming the file, never a read of 2^40 tokens."""
    path = _store(tmp_path / "s")
    target = path / "runs/r/trajectories/t1/zarr.json"
    node = json.loads(target.read_text())
    attrs = node["attributes"]["vinekv"]
    attrs[field] = value
    if field == "prompt_len":  # keep the lengths consistent with each other: only the prompt node disagrees
        attrs["response_token_ids"] = [1] * (attrs["length"] - value) if value else attrs["response_token_ids"]
    node["attributes"]["vinekv"] = seal(attrs)
    target.write_text(json.dumps(node))
    with pytest.raises(CorruptMetadataError, match=f"{target}: .*{re.escape(message)}"):
        _read_all(path)
