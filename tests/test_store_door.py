"""What the store refuses at spill (token ids outside the vocabulary, non-finite KV) and what it
does when a process exits without closing it (queued spills committed, a warning, no abort)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _store_worker import LAYOUT, PROMPT_LEN, synthetic_state

from vinekv.kvstore import (
    CorruptChunkError,
    CorruptMetadataError,
    EncodedState,
    MissingEntryError,
    SnapshotStore,
    StoreError,
    get_codec,
)

REPO = Path(__file__).resolve().parent.parent


def _encoded(state, codec_name: str) -> EncodedState:
    """``state`` encoded by ``codec_name`` on the host, as `capture_encoded` hands it to `spill`."""
    codec = get_codec(codec_name)
    parts = [
        codec.encode(state.keys[:, 0, lo:hi], state.values[:, 0, lo:hi])
        for lo, hi in ((0, PROMPT_LEN), (PROMPT_LEN, None))
    ]
    return EncodedState(*parts, codec.spec(), state.token_ids, PROMPT_LEN, state.layout, state.fingerprint)


@pytest.mark.parametrize("codec", ["lossless", "int8", "int4", "int4-hadamard"])
def test_spill_refuses_token_ids_outside_the_vocabulary(tmp_path, codec):
    with SnapshotStore.open(tmp_path / "s", codec=codec, chunk_tokens=64) as store:
        for bad, position in ((-1, 3), (LAYOUT.vocab_size, 40)):
            state = synthetic_state(1, length=100)
            state.token_ids[0, position] = bad
            message = rf"token id {bad} at position {position} is outside \[0, {LAYOUT.vocab_size}\)"
            with pytest.raises(ValueError, match=message):
                store.spill("r", "t", state, PROMPT_LEN)
            with pytest.raises(ValueError, match=message):
                store.spill("r", "t", _encoded(state, codec), PROMPT_LEN)
        store.spill("r", "ok", synthetic_state(2, length=100), PROMPT_LEN)
    with SnapshotStore.open(tmp_path / "s", mode="r") as store:
        assert store.runs() == ["r"] and store.trajectories("r") == ["ok"]  # nothing refused was stored


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the host int4 encode of Inf
@pytest.mark.parametrize("codec", ["lossless", "int8", "int4", "int4-hadamard"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_spill_refuses_non_finite_kv(tmp_path, codec, bad):
    """NaN/Inf KV is refused at spill with where it is, never stored (with int4 one NaN would
    otherwise make its whole 32-value group non-finite)."""
    with SnapshotStore.open(tmp_path / "s", codec=codec, chunk_tokens=64) as store:
        state = synthetic_state(1, length=100)
        state.values[2, 0, 57, 1, 5] = bad
        with pytest.raises(ValueError, match=r"values hold non-finite numbers \(NaN/Inf\) at layer 2, position 57"):
            store.spill("r", "t", state, PROMPT_LEN)
        with pytest.raises(ValueError, match="non-finite numbers"):
            store.spill("r", "t", _encoded(state, codec), PROMPT_LEN)
    with SnapshotStore.open(tmp_path / "s", mode="r") as store:
        assert store.runs() == []


_EXIT_WITHOUT_CLOSE = textwrap.dedent(
    """
    import sys
    from _store_worker import PROMPT_LEN, synthetic_state
    from vinekv.kvstore import SnapshotStore

    store = SnapshotStore.open(sys.argv[1], codec="lossless", chunk_tokens=64, durability=sys.argv[2])
    for n in range(12):
        store.spill("run0", f"traj{n:04d}", synthetic_state(n), PROMPT_LEN, reward=float(n))
    print("spilled", flush=True)
    """
)


@pytest.mark.parametrize("durability", ["trajectory", "flush"])
def test_exit_without_close_commits_queued_spills_and_warns(tmp_path, durability):
    """A process that spills and exits without `close()` exits normally, every spill it made is
    committed (with ``flush`` durability none would be otherwise), and it is told so on stderr."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    script = tmp_path / "exit_without_close.py"
    script.write_text(_EXIT_WITHOUT_CLOSE)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "s"), durability], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "terminate called" not in out.stderr
    assert "was not closed" in out.stderr and "committing 12 spilled trajectories" in out.stderr
    with SnapshotStore.open(tmp_path / "s", mode="r") as store:
        assert store.trajectories("run0") == [f"traj{n:04d}" for n in range(12)]
        for n in (0, 11):
            got = store.read_prefix("run0", f"traj{n:04d}", 1500)
            np.testing.assert_array_equal(got.keys, synthetic_state(n).keys)


_RACING_CLOSE = textwrap.dedent(
    """
    import sys, threading, time
    from _store_worker import PROMPT_LEN, synthetic_state
    from vinekv.kvstore import SnapshotStore

    store = SnapshotStore.open(sys.argv[1], codec="int8", chunk_tokens=64, durability="flush")

    def producer():
        for n in range(40):
            try:
                store.spill("r", f"t{n:03d}", synthetic_state(n, length=200), PROMPT_LEN)
            except RuntimeError as err:
                print("refused", n, err, flush=True)
                return
            print("spilled", n, flush=True)
            time.sleep(0.03)

    threading.Thread(target=producer).start()  # not a daemon: still spilling when the main thread ends
    time.sleep(0.3)
    """
)

_OPEN_AFTER_EXIT = textwrap.dedent(
    """
    import sys, threading, time
    from _store_worker import PROMPT_LEN, synthetic_state
    from vinekv.kvstore import SnapshotStore

    def late():
        time.sleep(0.2)  # the main thread has ended: the exit hook has run
        try:
            SnapshotStore.open(sys.argv[1], codec="int8", chunk_tokens=64)
        except RuntimeError as err:
            print("refused:", err, flush=True)

    threading.Thread(target=late).start()
    """
)


def test_a_spill_racing_the_close_at_exit_is_committed_or_refused(tmp_path):
    """F13: a thread still spilling while the exit hook closes a ``flush`` store: each spill that
    returned is committed; the first after the close began raises (it was lost silently before)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    script = tmp_path / "racing_close.py"
    script.write_text(_RACING_CLOSE)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "terminate called" not in out.stderr, out.stderr[-2000:]
    returned = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("spilled ")]
    assert returned == list(range(len(returned))) and 0 < len(returned) < 40
    assert f"refused {len(returned)} " in out.stdout and "is closed" in out.stdout
    with SnapshotStore.open(tmp_path / "s", mode="r") as store:
        assert store.trajectories("r") == [f"t{n:03d}" for n in returned] and store.verify() == []


def test_a_store_opened_for_writing_after_the_exit_hook_is_refused(tmp_path):
    """F14: a thread that opens a store after the main thread ended (exit hook already run) gets
    a clear error instead of a store nobody closes (lost spills, an abort at exit)."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    script = tmp_path / "open_after_exit.py"
    script.write_text(_OPEN_AFTER_EXIT)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "terminate called" not in out.stderr, out.stderr[-2000:]
    assert "refused: the interpreter is exiting" in out.stdout and not (tmp_path / "s").exists()


def test_a_spill_racing_the_deletion_of_its_run_fails_clearly_and_leaves_no_remains(tmp_path, monkeypatch):
    """Another writer deletes the run between the spill's check that its run exists and its
    commit: the spill fails naming the deletion, and the store lists and verifies clean."""
    writer = SnapshotStore.open(tmp_path / "s", codec="lossless", chunk_tokens=64)
    deleter = SnapshotStore.open(tmp_path / "s", codec="lossless", chunk_tokens=64)
    writer.spill("r", "t0", synthetic_state(0, length=100), PROMPT_LEN)
    writer.spill("keep", "t0", synthetic_state(1, length=100), PROMPT_LEN)
    writer.flush()
    commit = type(writer._backend).commit

    def deleted_meanwhile(backend, staging, final_prefix, *args, **kwargs):
        if final_prefix.startswith("runs/r/") and "r" in deleter.runs():
            deleter.delete_run("r")
        return commit(backend, staging, final_prefix, *args, **kwargs)

    monkeypatch.setattr(type(writer._backend), "commit", deleted_meanwhile)
    writer.spill("r", "t1", synthetic_state(2, length=300), PROMPT_LEN)
    with pytest.raises(StoreError, match="run 'r' was deleted while trajectory 't1' was being written"):
        writer.flush()
    monkeypatch.undo()
    assert deleter.runs() == ["keep"] and deleter.verify() == []
    writer.close()
    deleter.close()


@pytest.mark.parametrize("durability", ["trajectory", "flush"])
def test_a_run_deleted_just_after_a_commit_fails_the_spill_naming_the_deletion(tmp_path, monkeypatch, durability):
    """Another writer deletes the run between a node's rename into place and the fsync of its
    folder: the spill fails naming the deletion (it raised a bare FileNotFoundError before)."""
    writer = SnapshotStore.open(tmp_path / "s", codec="lossless", chunk_tokens=64, durability=durability)
    deleter = SnapshotStore.open(tmp_path / "s", codec="lossless", chunk_tokens=64)
    writer.spill("r", "t0", synthetic_state(0, length=100), PROMPT_LEN)
    writer.spill("keep", "t0", synthetic_state(1, length=100), PROMPT_LEN)
    writer.flush()
    rename = type(writer._backend)._rename

    def deleted_after(backend, staging, final_prefix):
        rename(backend, staging, final_prefix)
        if final_prefix.startswith("runs/r/trajectories/") and "r" in deleter.runs():
            deleter.delete_run("r")

    monkeypatch.setattr(type(writer._backend), "_rename", deleted_after)
    writer.spill("r", "t1", synthetic_state(2, length=300), PROMPT_LEN)
    expected = "run 'r' was deleted while trajectory 't1'" if durability == "trajectory" else "group commit .*deleted"
    with pytest.raises(StoreError, match=expected):
        writer.flush()
    monkeypatch.undo()
    assert deleter.runs() == ["keep"] and deleter.verify() == []
    writer.close()
    deleter.close()


def test_remains_of_a_run_deleted_under_an_older_writer_are_skipped_reported_and_collected(tmp_path):
    """What older versions left when a commit raced a deletion (a run folder holding a committed
    trajectory but no run metadata) does not break the listing; `verify` names it, `gc` removes it."""
    with SnapshotStore.open(tmp_path / "s", codec="lossless", chunk_tokens=64) as store:
        store.spill("keep", "t0", synthetic_state(1, length=100), PROMPT_LEN)
    remains = tmp_path / "s/runs/gone/trajectories"
    remains.mkdir(parents=True)
    shutil.copytree(tmp_path / "s/runs/keep/trajectories/t0", remains / "t0")
    with SnapshotStore.open(tmp_path / "s", mode="r") as store:
        assert store.runs() == ["keep"]
        problems = store.verify()
        assert [(p.run, p.trajectory_id) for p in problems] == [("gone", None)]
        assert "remains of a deleted run" in problems[0].message and "vinekv gc" in problems[0].message
    with SnapshotStore.open(tmp_path / "s") as store:
        report = store.collect_garbage()
        assert any(path.endswith("runs/gone") for path in report.removed)
        assert store.runs() == ["keep"] and store.verify() == []
    assert not (tmp_path / "s/runs/gone").exists()


def test_a_read_handle_reads_a_deleted_and_respilled_run_whole_or_raises(tmp_path):
    """A long-lived read handle never mixes generations: after another writer deletes a run and
    spills other data under the same ids, it reads the new data whole; after a deletion alone it
    says the trajectory is gone."""
    with SnapshotStore.open(tmp_path / "s", codec="lossless", chunk_tokens=64) as writer:
        writer.spill("r", "t0", synthetic_state(1, length=200), PROMPT_LEN)
    reader = SnapshotStore.open(tmp_path / "s", mode="r")
    old = reader.read_prefix("r", "t0", 200)
    np.testing.assert_array_equal(old.keys, synthetic_state(1, length=200).keys)
    for look_first in (False, True):
        with SnapshotStore.open(tmp_path / "s") as writer:
            writer.delete_run("r")
            writer.spill("r", "t0", synthetic_state(7 + look_first, length=200), PROMPT_LEN)
        if look_first:  # fresh metadata, arrays cached from the old generation
            assert reader.trajectory_info("r", "t0")["length"] == 200
        new, expected = reader.read_prefix("r", "t0", 200), synthetic_state(7 + look_first, length=200)
        np.testing.assert_array_equal(new.token_ids, expected.token_ids)
        np.testing.assert_array_equal(new.keys, expected.keys)
    with SnapshotStore.open(tmp_path / "s") as writer:
        writer.delete_run("r")
    with pytest.raises(MissingEntryError, match="no run 'r' in the store|was deleted"):
        reader.read_prefix("r", "t0", 200)
    reader.close()


def _two_trajectories(path: Path) -> None:
    with SnapshotStore.open(path, codec="lossless", chunk_tokens=64) as store:
        for n in (0, 1):
            store.spill("r", f"t{n}", synthetic_state(n, length=200), PROMPT_LEN)


def test_a_node_folder_copied_over_another_is_detected(tmp_path):
    _two_trajectories(tmp_path / "s")
    nodes = tmp_path / "s/runs/r/trajectories"
    shutil.rmtree(nodes / "t1")
    shutil.copytree(nodes / "t0", nodes / "t1")
    with SnapshotStore.open(tmp_path / "s", mode="r") as store:
        with pytest.raises(CorruptMetadataError, match="belongs to runs/r/trajectories/t0/"):
            store.read_prefix("r", "t1", 200)
        assert [(p.trajectory_id, "belongs to" in p.message) for p in store.verify()] == [("t1", True)]
        np.testing.assert_array_equal(store.read_prefix("r", "t0", 200).keys, synthetic_state(0, length=200).keys)


def test_data_files_swapped_between_nodes_are_detected(tmp_path):
    _two_trajectories(tmp_path / "s")
    nodes = tmp_path / "s/runs/r/trajectories"
    swapped = sorted(p.relative_to(nodes / "t0") for p in (nodes / "t0").rglob("*") if p.is_file() and "/c" in f"/{p}")
    assert swapped, "no chunk files found"
    name = swapped[0]
    a, b = (nodes / "t0" / name).read_bytes(), (nodes / "t1" / name).read_bytes()
    (nodes / "t0" / name).write_bytes(b)
    (nodes / "t1" / name).write_bytes(a)
    with SnapshotStore.open(tmp_path / "s", mode="r") as store:
        with pytest.raises(CorruptChunkError, match="does not match the content hash its node recorded"):
            store.read_prefix("r", "t1", 200)
        assert sorted(p.trajectory_id for p in store.verify()) == ["t0", "t1"]


def test_malformed_identity_fields_are_named_not_crashed_on(tmp_path):
    """Found by the long campaign's fuzz: a re-sealed node whose ``node`` or ``chunk_hashes`` has
    the wrong type raises `CorruptMetadataError` naming the field (was an AttributeError)."""
    from vinekv.kvstore.integrity import seal

    _two_trajectories(tmp_path / "s")
    path = tmp_path / "s/runs/r/trajectories/t1/zarr.json"
    original = json.loads(path.read_text())
    for field, bad in (("node", 7), ("node", {"at": 3}), ("chunk_hashes", "x"), ("chunk_hashes", {"kv": [1]})):
        doc = json.loads(json.dumps(original))
        doc["attributes"]["vinekv"] = seal({**doc["attributes"]["vinekv"], field: bad})
        path.write_text(json.dumps(doc))
        with SnapshotStore.open(tmp_path / "s", mode="r") as store, pytest.raises(CorruptMetadataError, match=field):
            store.read_prefix("r", "t1", 200)


def test_a_creation_killed_after_its_link_leaves_nothing_after_the_next_open(tmp_path):
    """Found by the long campaign's kill sweep (1 in 60 creation kills): a kill between linking
    the root and removing its temporary file left ``zarr.json.<hex>.tmp``; the next writer sweeps it."""
    _two_trajectories(tmp_path / "s")
    leftovers = [tmp_path / "s/zarr.json.9a17d7172fb6439abd898952bdb6512d.tmp", tmp_path / "s/runs/zarr.json.ab12.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"{}")
    with SnapshotStore.open(tmp_path / "s") as store:
        assert store.trajectories("r") == ["t0", "t1"]
    assert not any(p.exists() for p in leftovers)
