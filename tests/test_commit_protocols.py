"""The two commit protocols behind one backend interface: which one a location gets, and what
`MarkerCommit`'s garbage collection removes and keeps (on ``memory://``; the S3 server tests are
in test_object_store.py)."""

from __future__ import annotations

import json
import time

import pytest
from _store_worker import PROMPT_LEN, synthetic_state

from vinekv.kvstore import CorruptMetadataError, SnapshotStore
from vinekv.kvstore.backends.factory import open_backend
from vinekv.kvstore.backends.marker import MarkerCommit, attempt_age_s, attempt_name
from vinekv.kvstore.backends.rename import RenameCommit
from vinekv.kvstore.integrity import seal
from vinekv.kvstore.tensorstore_backend import group_json

LENGTH = 100


def test_a_location_gets_its_protocol(tmp_path):
    assert isinstance(open_backend(tmp_path / "a"), RenameCommit)
    assert isinstance(open_backend(f"file://{tmp_path}/b"), RenameCommit)
    assert isinstance(open_backend("memory://c/"), MarkerCommit)


def test_attempt_names_carry_their_age():
    name = attempt_name(1_700_000_000.0)
    assert name.startswith("attempt-1700000000000-") and attempt_age_s(name, 1_700_000_090.5) == 90.5
    assert attempt_age_s("q", 0.0) is None and attempt_age_s("attempt-12-ab", 0.0) is None


def _store_with_leftovers(url: str) -> tuple[SnapshotStore, dict[str, str]]:
    """A store whose trajectory t0 is committed, plus: an old and a young unmarked attempt beside
    t0's live one, an old attempt of an uncommitted t1, and an old attempt beside a damaged t2."""
    store = SnapshotStore.open(url, codec="int8")
    for n in (0, 2):
        store.spill("r", f"t{n}", synthetic_state(n, length=LENGTH), PROMPT_LEN)
    store.flush()
    kv = store._backend.kvstore
    old, young = attempt_name(time.time() - 7200), attempt_name(time.time())
    paths = {
        "live": "runs/r/trajectories/t0/" + store.trajectory_info("r", "t0")["data"],
        "old": f"runs/r/trajectories/t0/{old}/",
        "young": f"runs/r/trajectories/t0/{young}/",
        "orphan": f"runs/r/trajectories/t1/{old}/",
        "damaged": f"runs/r/trajectories/t2/{old}/",
    }
    for name in ("old", "young", "orphan", "damaged"):
        kv.write(paths[name] + "q/zarr.json", b"{}").result()
    kv.write("runs/r/trajectories/t2/zarr.json", b"not json").result()
    return store, paths


def test_marker_gc_removes_only_old_unmarked_attempts():
    store, paths = _store_with_leftovers("memory://gc/")
    report = store.collect_garbage()  # default grace: an hour
    assert sorted(report.removed) == sorted(f"memory://gc/{paths[n]}" for n in ("old", "orphan"))
    assert report.kept == (f"memory://gc/{paths['young']}",)
    for name, there in {"live": True, "old": False, "young": True, "orphan": False, "damaged": True}.items():
        assert bool(store._backend.keys(paths[name])) == there, name
    assert store.collect_garbage(grace_s=0).removed == (f"memory://gc/{paths['young']}",)
    assert store.read_prefix("r", "t0", LENGTH).position == LENGTH  # the committed node is whole
    with pytest.raises(ValueError, match="grace_s must be a number of seconds >= 0"):
        store.collect_garbage(grace_s=-1)
    store.close()


def test_a_marker_naming_a_path_outside_its_node_is_refused():
    store = SnapshotStore.open("memory://escape/", codec="int8")
    store.spill("r", "t0", synthetic_state(0, length=LENGTH), PROMPT_LEN)
    store.flush()
    key = "runs/r/trajectories/t0/zarr.json"
    node = json.loads(store._backend.kvstore.read(key).result().value)
    attrs = seal({**node["attributes"]["vinekv"], "data": "../t9/"})
    store._backend.kvstore.write(key, group_json({"vinekv": attrs})).result()
    store._reader.forget_run("r")
    with pytest.raises(CorruptMetadataError, match=r"data must name an attempt folder .* got '../t9/'"):
        store.read_prefix("r", "t0", LENGTH)
    store.close()


def test_gc_of_a_local_store_sweeps_staging_only_when_no_other_writer_is_active(tmp_path, capsys):
    from vinekv.cli import main

    path = tmp_path / "s"
    with SnapshotStore.open(path, codec="int8") as store:
        store.spill("r", "t0", synthetic_state(0, length=LENGTH), PROMPT_LEN)
    other = SnapshotStore.open(path, mode="r+")  # an active writer: its staging may be in use
    leftover = path / ".staging" / "dead-writer" / "node"
    leftover.mkdir(parents=True)
    assert main(["gc", str(path)]) == 0
    assert "other writers are active" in capsys.readouterr().out and leftover.exists()
    other.close()
    assert main(["gc", str(path)]) == 0
    assert f"removed {path / '.staging' / 'dead-writer'}" in capsys.readouterr().out
    assert not leftover.parent.exists()
    with SnapshotStore.open(path, mode="r") as store:
        assert store.trajectories("r") == ["t0"] and store.verify() == []


@pytest.mark.parametrize("outcome", ["condition failed", "timeout"])
def test_a_commit_whose_reply_is_lost_keeps_its_data(monkeypatch, outcome):
    """The marker was created but the writer did not learn it: a retried PUT whose condition then
    fails, or a timeout. Its attempt is the committed node's data and stays."""
    real_create = MarkerCommit._create

    def create_and_lose_the_reply(self, key, value):
        created = real_create(self, key, value)
        if "/trajectories/t0/" not in key:
            return created
        if outcome == "timeout":
            raise TimeoutError("no reply")
        return False

    url = f"memory://lost-{outcome.split()[0]}/"
    store = SnapshotStore.open(url, codec="int8")
    monkeypatch.setattr(MarkerCommit, "_create", create_and_lose_the_reply)
    store.spill("r", "t0", synthetic_state(0, length=LENGTH), PROMPT_LEN)
    if outcome == "timeout":
        with pytest.raises(Exception, match="no reply"):
            store.flush()
    else:
        store.flush()
    monkeypatch.undo()
    assert store.trajectories("r") == ["t0"] and store.verify() == []
    assert store.read_prefix("r", "t0", LENGTH).position == LENGTH
    store.close()
