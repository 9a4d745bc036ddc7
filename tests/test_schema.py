"""The store's metadata as typed nodes (`vinekv.kvstore.schema`), the one reader of MC values
(`MCRecord.of`), and the layering of the packages (`tools/import_graph.py`)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _store_worker import LAYOUT, PROMPT_LEN, synthetic_state

from vinekv.kvstore import CorruptMetadataError, SnapshotStore
from vinekv.kvstore.integrity import seal
from vinekv.kvstore.schema import MC_FIELD, REWARD_FIELD, PromptNode, RootMeta, TrajectoryNode
from vinekv.replay.values import MCRecord

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import import_graph  # noqa: E402


def _stored_attrs(path: Path, key: str) -> dict:
    return json.loads((path / key / "zarr.json").read_text())["attributes"]["vinekv"]


def test_nodes_read_and_write_exactly_the_stored_attributes(tmp_path):
    with SnapshotStore.open(tmp_path / "s", codec="int8") as store:
        store.spill("r", "t0", synthetic_state(0, length=100), PROMPT_LEN, answer="5", **{REWARD_FIELD: 1.0})
    t_attrs = _stored_attrs(tmp_path / "s", "runs/r/trajectories/t0")
    node = TrajectoryNode.from_attrs(t_attrs, "t0")
    assert seal(node.to_attrs()) == t_attrs  # nothing lost or added: the digest matches the stored one
    assert (node.prompt_len, node.length, node.stored_tokens) == (PROMPT_LEN, 100, 100 - PROMPT_LEN)
    assert node.identity.at == "runs/r/trajectories/t0/" and node.layout == LAYOUT
    assert node.reward == 1.0 and node.task_fields == {"answer": "5"}
    prompt_key = f"runs/r/prompts/{node.prompt}"
    prompt = PromptNode.from_attrs(_stored_attrs(tmp_path / "s", prompt_key), prompt_key)
    assert seal(prompt.to_attrs()) == _stored_attrs(tmp_path / "s", prompt_key)
    assert len(prompt.token_ids) == PROMPT_LEN and set(prompt.chunk_hashes) == set(prompt.arrays)
    root = json.loads((tmp_path / "s/zarr.json").read_text())["attributes"]["vinekv"]
    assert seal(RootMeta.from_attrs(root, "root").to_attrs()) == root
    with SnapshotStore.open(tmp_path / "s", mode="r") as store:
        assert store.trajectory("r", "t0") == node and store.trajectory_info("r", "t0") == node.to_attrs()


def test_a_node_written_before_identities_and_hashes_still_reads(tmp_path):
    with SnapshotStore.open(tmp_path / "s", codec="lossless") as store:
        state = synthetic_state(1, length=90)
        store.spill("r", "t0", state, PROMPT_LEN)
    attrs = _stored_attrs(tmp_path / "s", "runs/r/trajectories/t0")
    old = {k: v for k, v in attrs.items() if k not in ("node", "chunk_hashes", "digest")}
    node = TrajectoryNode.from_attrs(seal(old), "old")
    assert node.identity is None and node.chunk_hashes is None
    assert seal(node.to_attrs()) == seal(old)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prompt_len", 0, "prompt_len must be an int >= 1"),
        ("response_token_ids", [1, 2], "response_token_ids must list"),
        ("node", {"at": 3}, "node must be an object"),
        ("data", "../t9/", "data must name an attempt folder"),
        ("layout", {"num_layers": 2}, "layout must be an object with keys"),
        ("kind", "prompt", "kind 'prompt', expected 'trajectory'"),
    ],
)
def test_a_malformed_field_is_corrupt_metadata_naming_it(tmp_path, field, value, message):
    with SnapshotStore.open(tmp_path / "s", codec="int8") as store:
        store.spill("r", "t0", synthetic_state(0, length=100), PROMPT_LEN)
    attrs = _stored_attrs(tmp_path / "s", "runs/r/trajectories/t0")
    with pytest.raises(CorruptMetadataError, match=f"^where: {message}"):
        TrajectoryNode.from_attrs({**attrs, field: value}, "where")


def test_mc_record_of_a_node(tmp_path):
    with SnapshotStore.open(tmp_path / "s", codec="int8") as store:
        store.spill("r", "t0", synthetic_state(0, length=100), PROMPT_LEN)
        store.flush()
        assert MCRecord.of(store.trajectory("r", "t0")) is None
        record = MCRecord("cfg", "full", PROMPT_LEN, np.array([0, 5]), ((1.0, 0.0), (1.0,)), 12, "policy")
        store.annotate("r", "t0", **{MC_FIELD: record.to_fields()})
        got = MCRecord.of(store.trajectory("r", "t0"))
        assert got.returns == record.returns and got.policy == "policy" and got.branch_tokens == 12
        np.testing.assert_array_equal(got.stats.mean, [0.5, 1.0])
        node = store.trajectory("r", "t0")
        older = dataclasses.replace(node, fields={MC_FIELD: {"mean": [0.5]}})
        with pytest.raises(ValueError, match="written by an older vinekv"):
            MCRecord.of(older)


def test_the_layers_import_only_downward_and_without_cycles():
    edges = import_graph.graph()
    assert "vinekv.kvstore.store" in edges and "vinekv.kvstore.schema" in edges["vinekv.kvstore.reads"]
    assert import_graph.upward_imports(edges) == []
    assert import_graph.cycles(edges) == []
    assert import_graph.bare_imports() == []


def test_the_import_checks_find_a_cycle_an_upward_and_a_bare_import(tmp_path):
    files = {
        "kvstore/a.py": "from vinekv.replay import b\n",
        "replay/b.py": "from vinekv.replay.c import x\n",
        "replay/c.py": "import vinekv.replay.b\nx = 1\n",
        "trainer/d.py": "from kvstore import a\n",
    }
    for folder in import_graph.FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    edges = import_graph.graph(tmp_path)
    assert import_graph.upward_imports(edges) == [("vinekv.kvstore.a", "vinekv.replay.b")]
    assert import_graph.cycles(edges) == [["vinekv.replay.b", "vinekv.replay.c"]]
    assert import_graph.bare_imports(tmp_path) == [("vinekv.trainer.d", "kvstore")]


def test_writing_and_reading_host_arrays_never_imports_jax(tmp_path):
    """The store's own processes (writers, `vinekv verify`, campaign workers) start without JAX:
    spill, read and verify of host arrays load neither JAX nor EasyDeL."""
    script = (
        "import sys\n"
        "from _store_worker import PROMPT_LEN, synthetic_state\n"
        "from vinekv.kvstore import SnapshotStore\n"
        f"with SnapshotStore.open({str(tmp_path / 's')!r}, codec='int4') as store:\n"
        "    store.spill('r', 't', synthetic_state(0, length=100), PROMPT_LEN)\n"
        f"with SnapshotStore.open({str(tmp_path / 's')!r}, mode='r') as store:\n"
        "    assert store.read_prefix('r', 't', 50).keys.shape[2] == 50 and store.verify() == []\n"
        "print(sorted(m for m in ('jax', 'easydel') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_run_fields_are_sealed_kept_across_writers_and_leave_the_generation(tmp_path):
    """`annotate_run` merges fields into the run's metadata (the rollout recipe lives there): sealed
    like the rest, the generation unchanged, and an edit of the stored fields is refused by name."""
    from vinekv.kvstore import StoreError
    from vinekv.kvstore.schema import RunNode

    path = tmp_path / "s"
    with SnapshotStore.open(path, codec="lossless") as store:
        store.spill("r", "t0", synthetic_state(0, length=80), PROMPT_LEN)
        store.flush()
        before = _stored_attrs(path, "runs/r")
        assert "fields" not in before and store.run_fields("r") == {}  # runs without fields keep their old seal
        store.annotate_run("r", vinekv_rollout={"horizon": 40}, note="a")
        with SnapshotStore.open(path, mode="r+") as other:
            other.annotate_run("r", note="b")
        assert store.run_fields("r") == {"vinekv_rollout": {"horizon": 40}, "note": "b"}
        after = _stored_attrs(path, "runs/r")
        assert after["generation"] == before["generation"] and seal(RunNode.from_attrs(after, "r").to_attrs()) == after
        with pytest.raises(StoreError, match="no run 'q'"):
            store.annotate_run("q", note="x")
        with pytest.raises(TypeError):
            store.annotate_run("r", note=object())
        assert store.read_prefix("r", "t0", 80).position == 80  # reads go on across the run's new metadata
    doc = json.loads((path / "runs/r/zarr.json").read_text())
    doc["attributes"]["vinekv"]["fields"]["note"] = "edited"
    (path / "runs/r/zarr.json").write_text(json.dumps(doc))
    with SnapshotStore.open(path, mode="r") as store, pytest.raises(CorruptMetadataError, match="runs/r/zarr.json"):
        store.run_fields("r")
    with pytest.raises(CorruptMetadataError, match="fields must be a JSON object"):
        RunNode.from_attrs({"kind": "run", "generation": "g", "fields": [1]}, "r")
