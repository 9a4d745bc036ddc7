"""`vinekv inspect` on a store with real captured KV and real MC values: runs, trajectories, steps."""

from __future__ import annotations

import numpy as np
import pytest

from vinekv.cli import main
from vinekv.inspection import build_steps, choose_tokenizer, compact_fields, shorten
from vinekv.kvstore import SnapshotStore, capture_state
from vinekv.kvstore.fingerprint import policy_fingerprint
from vinekv.models import build_tokenizer
from vinekv.replay.branch_replay import ReplayConfig, replay_run
from vinekv.replay.values import MCRecord
from vinekv.trainer.advantages import trajectory_advantages

PROMPT = b"Q: 2+3?\n"
RESPONSES = [b"2+3\n=5\nA: 5", b"think\nA: 6", b"A: 5"]
STEPS_T0 = ["2+3\\n", "=5\\n", "A: 5"]


def _reward(prompts, completions, answer, **kwargs):
    """Half for ending with the answer, half the fraction of even bytes: values inside (0, 1)."""
    return [
        0.5 * c.rstrip().endswith(a) + 0.5 * sum(b % 2 == 0 for b in c.encode()) / max(1, len(c.encode()))
        for c, a in zip(completions, answer, strict=True)
    ]


@pytest.fixture(scope="module")
def store_path(tiny_model, tmp_path_factory):
    """Run r0: three valued trajectories (t0, t1 with a reward, t2 without); run r1: one
    trajectory without MC values."""
    path = tmp_path_factory.mktemp("inspect") / "store"
    seqs = [np.frombuffer(PROMPT + r, dtype=np.uint8).astype(np.int32)[None] for r in RESPONSES]
    with SnapshotStore.open(path, codec="lossless") as store:
        for i, seq in enumerate(seqs):
            store.spill("r0", f"t{i}", capture_state(tiny_model, seq, seq.shape[1]), len(PROMPT), answer="5")
        store.spill("r1", "only", capture_state(tiny_model, seqs[2], seqs[2].shape[1]), len(PROMPT), answer="5")
        store.flush()
        config = ReplayConfig(branches=2, max_tokens=4, seed=1, unfinished_reward=None)
        replay_run(store, "r0", tiny_model, build_tokenizer(), _reward, config, progress=False)
        store.annotate("r0", "t0", vinekv_reward=1.0)
        store.annotate("r0", "t1", vinekv_reward=0.0)
    return path


def _records(path) -> dict[str, tuple[MCRecord, dict]]:
    with SnapshotStore.open(path, mode="r") as store:
        infos = {tid: store.trajectory_info("r0", tid) for tid in store.trajectories("r0")}
    return {tid: (MCRecord.from_fields(i["fields"]["mc"]), i) for tid, i in infos.items()}


def _rows(text: str, first: str) -> list[list[str]]:
    """Body rows of the table whose header line starts with ``first``, split on runs of spaces."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [first]) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line)
    return rows


def test_runs_table(store_path, tiny_model, capsys):
    assert main(["inspect", str(store_path)]) == 0
    out = capsys.readouterr().out
    assert "layout: llama, 2 layers x 2 KV heads x 16, float32, vocabulary 260" in out
    rows = {r.split()[0]: r.split() for r in _rows(out, "run")}
    assert set(rows) == {"r0", "r1"}
    means = [m for rec, _ in _records(store_path).values() for m in rec.stats.mean]
    r0 = rows["r0"]
    # run, traj, raw and stored (number + unit each), ratio, codec, fingerprint, MC, mode, states, mean V, K
    assert r0[1] == "3" and r0[7] == "lossless+zstd1" and r0[8] == policy_fingerprint(tiny_model)[:8]
    assert r0[9:] == ["3/3", "full", "6", f"{np.mean(means):.3f}", "2.0"]
    assert rows["r1"][9:] == ["0/1", "-", "0", "-", "-"]
    with SnapshotStore.open(store_path, mode="r") as store:
        size = store.size("r0")
    assert f"{size.raw / size.stored:.2f}x" in r0


def test_trajectories_table(store_path, capsys):
    assert main(["inspect", str(store_path), "--run", "r0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run r0: 3 trajectories (3 with MC values)")
    rows = {r.split()[0]: r.split() for r in _rows(out, "trajectory")}
    for tid, (record, info) in _records(store_path).items():
        mean = record.stats.mean
        reward = {"t0": "1.000", "t1": "0.000", "t2": "-"}[tid]
        expected = [tid, "8", str(len(info["response_token_ids"])), reward, f"{len(mean)}/{len(mean)}"]
        expected += [f"{mean.mean():.3f}", f"{mean.min():.3f}", f"{mean.max():.3f}", "2", "answer='5'"]
        assert rows[tid] == expected


def test_trajectory_steps_and_plot(store_path, tmp_path, tokenizer_dir, capsys):
    plot = tmp_path / "t0.png"
    assert main(["inspect", str(store_path), "--run", "r0", "--trajectory", "t0", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("run r0, trajectory t0: 8 prompt + 11 response tokens, reward 1.000, MC mode full")
    assert "prompt: Q: 2+3?\\n" in out and "fields: answer='5'" in out
    record, _ = _records(store_path)["t0"]
    stats = record.stats
    adv = trajectory_advantages("full", 11, record.response_positions, stats.mean, 1.0, gamma=1.0)
    rows = _rows(out, "pos")
    assert len(rows) == 3
    for row, pos, text, mean, se, k in zip(
        rows, [0, 4, 7], STEPS_T0, stats.mean, stats.stderr, stats.count, strict=True
    ):
        first, *middle = row.split(maxsplit=1)
        text_cell, v, s, kk, a = middle[0].rsplit(maxsplit=4)
        assert int(first) == pos and text_cell.strip() == text
        assert (v, s, kk, a) == (f"{mean:.3f}", f"{se:.3f}", str(k), f"{adv[pos]:+.3f}")
    assert f"plot written to {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # an explicit tokenizer folder decodes the same text; no reward: advantages skipped, said so
    argv = ["inspect", str(store_path), "--run", "r0", "--trajectory", "t2", "--tokenizer", str(tokenizer_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reward unknown" in out and "advantages skipped" in out
    (row,) = _rows(out, "pos")
    assert row.split()[:3] == ["0", "A:", "5"] and row.split()[-1] == "-"


def test_errors(store_path, tmp_path, capsys):
    cases = {
        (str(tmp_path / "absent"),): "no store at",
        (str(store_path), "--run", "nope"): "no run 'nope' in the store (runs: ['r0', 'r1'])",
        (str(store_path), "--run", "r0", "--trajectory", "t9"): "no trajectory 't9' in run 'r0' (trajectories: t0",
        (str(store_path), "--trajectory", "t0"): "--trajectory needs --run",
        (str(store_path), "--run", "r0", "--plot", str(tmp_path / "x.png")): "--plot needs --trajectory",
        (str(store_path), "--run", "r1", "--trajectory", "only", "--plot", str(tmp_path / "y.png")): "no MC values",
    }
    for argv, message in cases.items():
        assert main(["inspect", *argv]) == 2, argv
        captured = capsys.readouterr()
        assert captured.err.startswith("vinekv inspect: error: ") and message in captured.err, (argv, captured.err)
        assert not captured.out
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_lite_steps_text_before_the_first_anchor():
    """Lite anchors need not start at 0: the text before the first one is a step without a state,
    and each span's advantage is the mean of mc_gae's token advantages over it."""
    record = MCRecord("digest", "lite", 2, [3, 5], [[1.0, 0.0], [1.0, 1.0, 0.0]])
    ids = list(b"ab\ncd\nef")
    steps, token_adv = build_steps(ids, record, 1.0, lambda part: bytes(part).decode())
    expected = trajectory_advantages("lite", 8, np.array([3, 5]), record.stats.mean, 1.0, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(token_adv, expected)
    assert [(s.start, s.end, s.text, s.state) for s in steps] == [
        (0, 3, "ab\n", False),
        (3, 5, "cd", True),
        (5, 8, "\nef", True),
    ]
    assert steps[1].count == 2 and steps[2].count == 3 and steps[1].mean == 0.5
    assert steps[2].advantage == pytest.approx(expected[5:].mean())
    assert build_steps(ids, record, None, lambda part: "")[1] is None


def test_text_helpers_and_default_tokenizer():
    assert shorten("a\nb\tc", 20) == "a\\nb\\tc"
    cut = shorten("x" * 30 + "\n" + "the result is 42", 24)
    assert len(cut) <= 24 and cut.startswith("xxx") and cut.endswith("is 42") and "…" in cut
    assert shorten("abc\n" * 10, 9).count("\\") == shorten("abc\n" * 10, 9).count("\\n")  # never half an escape
    assert compact_fields({"answer": "5", "mc": {}, "vinekv_entropy": [0.1] * 50, "vinekv_group": 3}) == (
        "answer='5', vinekv_group=3"
    )
    from vinekv.tasks import arithmetic

    _, name = choose_tokenizer(None, arithmetic.vocab_size())
    assert name == "arithmetic task tokenizer"
    assert choose_tokenizer(None, 260)[1] == "byte tokenizer"
