"""The reliability campaign, short version (tests/reliability_campaign.py; the long run and its
figures: docs/reliability.md): SIGKILLs of every writing operation, a corruption oracle over
every kind of store file, files exchanged between nodes, deletions racing writers, bad input at
the door, exits without close(), a fuzz of the metadata parser, the opener and ids; and, for each
finding of the campaign (F1-F11, all fixed), a minimal regression test."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from reliability_campaign import (
    DOOR_CODECS,
    DOOR_KINDS,
    EXIT_MODES,
    FILE_KINDS,
    FUZZ_GROUPS,
    THREAD_EXITS,
    _build_store,
    _leftovers,
    campaign_fields,
    campaign_state,
    corruption_sweep,
    delete_race_sweep,
    door_sweep,
    exchange_sweep,
    exit_sweep,
    expected_kv,
    fuzz,
    kill_sweep,
    length,
    prompt_len,
    tid_of,
)

from vinekv.kvstore import SnapshotStore
from vinekv.kvstore.errors import CorruptMetadataError, MissingEntryError, StoreError
from vinekv.kvstore.integrity import json_digest, seal

KILLS = 5  # per operation; the long run does 50+


@pytest.mark.parametrize("operation", ["spill", "annotate", "delete", "create"])
def test_kill_sweep_keeps_every_invariant(tmp_path, operation):
    """SIGKILL at random points: committed trajectories exact, nothing partial visible, the next
    open leaves no leftovers, the operation resumed gives an uninterrupted run's values."""
    result = kill_sweep(operation, KILLS, tmp_path, seed=11)
    assert result["kills"] >= KILLS
    assert result["violations"] == []
    if operation == "annotate":
        assert result["resumed_identical"] == result["episodes"]
    if operation == "create":
        assert result["races_a"] >= 1 and result["races_w-"] >= 1


def test_corruption_of_every_file_kind_is_detected(tmp_path):
    """Flips, digit edits, truncations and deletions of every kind of file, three codecs: each
    read raises a StoreError or returns the truth, and every mutation is detected."""
    result = corruption_sweep(
        tmp_path, ("lossless", "int8", "int4"), mutations_per_file=1, seed=12, max_files_per_kind=2
    )
    assert result["kinds"] == sorted(FILE_KINDS)
    mutations = {key.split("/")[1] for key, row in result["table"].items() if row.get("injected")}
    assert mutations == {"flip", "digit", "truncate", "delete", "flip_data", "flip_index"}
    assert result["silent_wrong"] == 0, result["cases"]["silent_wrong"]
    assert result["crash"] == 0, result["cases"]["crash"]
    assert result["harmless"] == 0, result["cases"]["harmless"]
    assert result["detected"] == result["injected"]


def test_files_exchanged_between_nodes_are_detected(tmp_path):
    """Whole valid files moved between nodes (a node folder copied over another, a shard or the
    node metadata swapped): every exchange is detected, none reads back as the truth's data."""
    result = exchange_sweep(tmp_path, ("lossless", "int8"), seed=14, max_pairs=6)
    exchanges = {key.split("/")[1] for key, row in result["table"].items() if row.get("injected")}
    assert exchanges == {"copy_node", "swap_shard", "swap_meta"}
    assert result["silent_wrong"] == 0, result["cases"]["silent_wrong"]
    assert result["crash"] == 0, result["cases"]["crash"]
    assert result["detected"] == result["injected"] > 0


def test_deletions_racing_writers_and_readers_keep_every_invariant(tmp_path):
    """A run deleted while a process spills into it, then written again under the same ids: the
    spill ends or names the deletion, the store lists and verifies clean, and a read handle
    opened before reads the new data whole or raises."""
    result = delete_race_sweep(4, tmp_path, seed=15)
    assert result["rounds"] == 4
    assert result["violations"] == []


def test_bad_input_at_the_door_is_refused_and_leaves_nothing(tmp_path):
    """Token ids below 0 or beyond the vocabulary and NaN/+Inf/-Inf KV, as host states and as
    host-encoded codes, three codecs, both durabilities, among good spills: every bad spill is
    refused naming the problem, nothing of it is stored, every good spill reads back exactly."""
    result = door_sweep(60, tmp_path, seed=16)
    assert result["violations"] == []
    assert set(result["table"]) == {f"{kind}/{codec}" for kind in DOOR_KINDS for codec in DOOR_CODECS}
    assert all(row["host"] == row["encoded"] == 2 for row in result["table"].values())
    assert result["cases_trajectory"] == result["cases_flush"] == 30
    assert result["silent_wrong"] == 0, result["cases"]["silent_wrong"]
    assert result["crash"] == 0, result["cases"]["crash"]
    assert result["detected"] == result["injected"] == 60
    assert result["good_checked"] == result["good_host"] + result["good_encoded"] > 6


def test_exit_without_close_commits_every_spill(tmp_path):
    """Processes that spill and exit without `close()` (end of script, sys.exit, an uncaught
    exception, the store dropped), both durabilities: the expected exit code, never an abort, the
    warning names the spills since the last flush, every spill is committed and reads back exactly.
    A thread spilling while the exit closes the store (F13): what returned is committed, the next
    spill refused; a thread opening a store after the exit hook (F14): refused, nothing created."""
    result = exit_sweep(1, tmp_path, seed=18, modes=EXIT_MODES, max_spills=12)
    assert result["violations"] == []
    table = result["table"]
    assert set(table) == {
        "end/trajectory",
        "sys_exit/flush",
        "exception/trajectory",
        "dropped/flush",
        "late_thread/trajectory",
        "racing_thread/flush",
    }
    assert result["rounds"] == 6 and result["aborted"] == 0
    assert result["committed"] == result["spilled"] > 0
    main_thread = [row for key, row in table.items() if key.split("/")[0] not in THREAD_EXITS]
    # a queue still busy at exit is always committed with a warning; a warning without a busy queue
    # is the flush mode's commit of written but unflushed spills (how many are busy is timing)
    assert all(row["warned"] >= row["busy_at_exit"] for row in main_thread)
    assert sum(row["warned"] for row in main_thread) >= 1
    assert table["racing_thread/flush"]["committed"] == table["racing_thread/flush"]["spilled"] > 0
    assert table["late_thread/trajectory"]["open_refused"] == 1 and table["late_thread/trajectory"]["spilled"] == 0


def test_fuzz_of_metadata_opener_and_ids(tmp_path):
    """Malformed and re-sealed metadata, absurd shapes, hostile ids and open arguments: clear
    errors only, no process death, nothing written outside the store, bounded memory."""
    result = fuzz(tmp_path, max_examples=60, seed=13)
    assert set(result["groups"]) == set(FUZZ_GROUPS)
    assert result["findings"] == []
    assert result["crashes"] == []
    assert result["outside_writes"] == []
    assert result["maxrss_mb"] < 1024


# -- regressions: the findings of the campaign's first run (docs/reliability.md) -------------
def _store(tmp_path: Path) -> Path:
    return _build_store(tmp_path / "s", "int8", {"r": (0, 1)})


def _edit(path: Path, edit) -> None:
    node = json.loads(path.read_text())
    edit(node)
    path.write_text(json.dumps(node))


def test_f1_a_downgraded_root_does_not_read_missing_chunks_as_zeros(tmp_path):
    """A root edited to format_version 1 (digest stale) once turned every integrity check off."""
    path = _store(tmp_path)
    _edit(path / "zarr.json", lambda n: n["attributes"]["vinekv"].__setitem__("format_version", 1))
    (shard,) = [p for p in (path / "runs/r/trajectories/t001/q/c").rglob("*") if p.is_file()]
    shard.unlink()
    with pytest.raises(StoreError), SnapshotStore.open(path, mode="r") as store:  # refused at open or at the read
        got = store.read_prefix("r", tid_of(1), length(1))  # F1: zeros for the whole response
        kv = np.stack([got.keys[:, 0], got.values[:, 0]], axis=1)
        assert kv.tobytes() == expected_kv(1, "int8").tobytes()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.trajectory_info("r", "../r/trajectories/t000"),
        lambda s: s.read_prefix("r", "t000/", 1),
        lambda s: s.trajectories("."),
        lambda s: s.size(""),
    ],
    ids=["info-traversal", "read-slash", "trajectories-dot", "size-empty"],
)
def test_f2_an_invalid_id_is_a_bad_argument_not_corruption(tmp_path, call):
    """F2: TensorStore's "Invalid key" came out as CorruptMetadataError on an intact store."""
    with SnapshotStore.open(_store(tmp_path), mode="r") as store, pytest.raises((ValueError, MissingEntryError)):
        call(store)


def test_f3_an_absurd_chunk_tokens_is_refused_at_open(tmp_path):
    """F3: chunk_tokens 2^24 or more aborted the process (std::bad_alloc) at the first spill."""
    with pytest.raises(ValueError, match="chunk_tokens"):
        SnapshotStore.open(tmp_path / "s", chunk_tokens=2**40).close()  # never spill into it


def test_f15_an_absurd_cache_bytes_is_a_bad_argument_and_creates_nothing(tmp_path):
    """F15: cache_bytes 2^64 raised TensorStore's OverflowError, after creating the store's folder."""
    with pytest.raises(ValueError, match=r"cache_bytes must be an int in \[0, 2\*\*63\)"):
        SnapshotStore.open(tmp_path / "s", cache_bytes=2**64)
    assert not (tmp_path / "s").exists()


def test_f4_deeply_nested_json_is_corrupt_metadata(tmp_path):
    """F4: a zarr.json damaged into deeply nested JSON raised RecursionError."""
    path = _store(tmp_path)
    (path / "runs/r/trajectories/t000/zarr.json").write_bytes(b"[" * 100_000)
    with SnapshotStore.open(path, mode="r") as store, pytest.raises(CorruptMetadataError):
        store.trajectory_info("r", tid_of(0))


def _root_without_codec(path: Path) -> None:
    _edit(path / "zarr.json", lambda n: n["attributes"].__setitem__("vinekv", seal(_drop(n, "codec"))))


def _drop(node: dict, key: str) -> dict:
    attrs = dict(node["attributes"]["vinekv"])
    attrs.pop(key)
    return attrs


def _array_int_beyond_uint64(path: Path) -> None:
    meta_path, node_path = path / "runs/r/trajectories/t001/q/zarr.json", path / "runs/r/trajectories/t001/zarr.json"
    _edit(meta_path, lambda m: m["attributes"]["vinekv"].__setitem__("token_group", 2**64))
    digest = json_digest(json.loads(meta_path.read_text()))

    def reseal(node: dict) -> None:
        attrs = node["attributes"]["vinekv"]
        attrs["arrays"]["q"] = digest
        node["attributes"]["vinekv"] = seal(attrs)

    _edit(node_path, reseal)


@pytest.mark.parametrize("damage", [_root_without_codec, _array_int_beyond_uint64], ids=["root-codec", "array-2^64"])
def test_f5_resealed_bad_metadata_raises_a_store_error(tmp_path, damage):
    """F5: re-sealed metadata without a codec, or with an int of 2^64, escaped as KeyError/OverflowError."""
    path = _store(tmp_path)
    damage(path)
    try:
        with SnapshotStore.open(path, mode="r") as store:
            store.read_prefix("r", tid_of(1), length(1))
    except StoreError:
        return
    except Exception as err:  # F5: anything else
        pytest.fail(f"{type(err).__name__}: {err}")
    pytest.fail("read without error")


def test_f6_a_group_with_another_zarr_format_is_refused(tmp_path):
    """F6: a group's zarr_format is outside the digest and was not checked."""
    path = _store(tmp_path)
    _edit(path / "runs/r/zarr.json", lambda n: n.__setitem__("zarr_format", 4))
    with SnapshotStore.open(path, mode="r") as store, pytest.raises(CorruptMetadataError):
        store.trajectories("r")


def test_f7_an_annotate_cut_short_leaves_nothing_beside_the_node(tmp_path, monkeypatch):
    """F7: annotate wrote through TensorStore, whose zarr.json.__lock a kill left in the node's
    folder for good; the new metadata now waits in the writer's staging folder (swept)."""
    path = _store(tmp_path)
    store = SnapshotStore.open(path, mode="r+")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies before the new metadata is renamed into place

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.annotate("r", tid_of(0), mc_test=[1.0])
    monkeypatch.undo()
    os.close(store._backend._lock_fd)  # the dead process's lock goes with it
    assert sorted(p.name for p in (path / "runs/r/trajectories/t000").iterdir()) == ["q", "scale", "zarr.json"]
    SnapshotStore.open(path, mode="r+").close()
    assert _leftovers(path) == []
    with SnapshotStore.open(path, mode="r") as reader:
        assert "mc_test" not in reader.trajectory_info("r", tid_of(0))["fields"]


def test_f8_an_interrupted_creation_leaves_nothing_behind(tmp_path):
    """F8: a creation killed while writing runs/zarr.json left its temporary file for good."""
    path = tmp_path / "s"
    (path / "runs").mkdir(parents=True)
    tmp = path / "runs/zarr.json.0123456789ab.tmp"  # what a SIGKILL in creation leaves (kill sweep)
    tmp.write_bytes(b'{\n "zarr_format": 3,\n "node_type": "group",\n "attri')
    SnapshotStore.open(path, mode="a", codec="int8").close()
    assert not tmp.exists()


def test_f9_one_spill_starts_one_writer_thread(tmp_path):
    """F9: the first spill started all write_concurrency threads (2^31: RuntimeError, or an abort)."""
    with SnapshotStore.open(tmp_path / "s", codec="int8", write_concurrency=32) as store:
        store.spill("r", tid_of(0), campaign_state(0), prompt_len(0), **campaign_fields(0))
        assert sum(t.name == "vinekv-spill" for t in threading.enumerate()) <= 2


def test_f10_an_interrupted_lock_file_creation_leaves_nothing_behind(tmp_path):
    """F10: a writer killed in `lock_for_writing` while it wrote ``.staging/zarr.json`` (20% of
    the creation kills) left ``zarr.json.<hex>.tmp`` for good. The lock file is now created in
    place (``O_EXCL``), and the sweep removes such temporary files and rewrites a torn lock file."""
    path = _store(tmp_path)
    (path / ".staging/zarr.json").unlink()  # the killed writer had not renamed it into place
    tmp = path / ".staging/zarr.json.0123456789ab.tmp"
    tmp.write_bytes(b'{\n "zarr_format": 3,\n "node_type": "gro')
    SnapshotStore.open(path, mode="r+").close()
    assert not tmp.exists()


def _layout_without_num_layers(path: Path) -> None:
    _reseal_trajectory(path, lambda attrs: attrs["layout"].pop("num_layers"))


def _layout_with_other_num_layers(path: Path) -> None:
    _reseal_trajectory(path, lambda attrs: attrs["layout"].__setitem__("num_layers", 3))


def _reseal_trajectory(path: Path, edit) -> None:
    def reseal(node: dict) -> None:
        attrs = node["attributes"]["vinekv"]
        edit(attrs)
        node["attributes"]["vinekv"] = seal(attrs)

    _edit(path / "runs/r/trajectories/t001/zarr.json", reseal)


@pytest.mark.parametrize(
    "damage", [_layout_without_num_layers, _layout_with_other_num_layers], ids=["missing-key", "other-layers"]
)
def test_f11_a_resealed_node_layout_is_corrupt_metadata(tmp_path, damage):
    """F11: a node's layout, edited and re-sealed, escaped as TypeError/ValueError."""
    path = _store(tmp_path)
    damage(path)
    with SnapshotStore.open(path, mode="r") as store, pytest.raises(CorruptMetadataError, match="t001/zarr.json"):
        store.read_prefix("r", tid_of(1), length(1))


def test_f12_a_resealed_layout_is_refused_also_where_no_array_of_the_node_is_read(tmp_path):
    """F12: a trajectory node's layout (num_layers 7, re-sealed) read at t=1, where only the
    prompt's arrays are read, escaped as a ValueError from CachedState."""
    path = _store(tmp_path)
    _reseal_trajectory(path, lambda attrs: attrs["layout"].__setitem__("num_layers", 7))
    with SnapshotStore.open(path, mode="r") as store, pytest.raises(CorruptMetadataError, match="is not the store's"):
        store.read_prefix("r", tid_of(1), 1)
