"""VinePPO's estimator as the paper defines it: the whole path from token ids to per-token
advantages against a plainly written reference, linear text offsets, branch horizons, stop
tokens, adaptive K and extending K after the fact."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
from conftest import no_cache_logits
from easydel.inference.sampling_params import SamplingParams

from vinekv.kvstore import SnapshotStore, capture_state
from vinekv.kvstore.capture import capture_with_entropy
from vinekv.models import build_bpe_tokenizer
from vinekv.replay.branch_replay import (
    ReplayConfig,
    ValueRequest,
    plan_trajectory,
    replay_run,
    trajectory_states,
    value_trajectories,
)
from vinekv.replay.sampler import generate_branches
from vinekv.replay.text import prefix_ends, text_offsets
from vinekv.replay.values import MCRecord
from vinekv.trainer.advantages import trajectory_advantages

PROMPT = b"Q: 2+3?\n"


@pytest.fixture(scope="module")
def byte_tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def arithmetic_corpus() -> list[str]:
    rng = random.Random(0)
    pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(400)]
    return [f"{a}+{b}={a + b}\nthen x2\n#### {2 * (a + b)}\n\n" for a, b in pairs]


@pytest.fixture(scope="module")
def bpe_tok():
    """A BPE tokenizer trained on arithmetic text: multi-character tokens, some spanning newlines."""
    tok = build_bpe_tokenizer(arithmetic_corpus())
    assert any("\n" in tok.decode([i])[:-1] for i in range(len(tok)))  # tokens spanning a newline
    return tok


def random_response(rng: random.Random) -> str:
    lines = [
        rng.choice(["12+7=19", "19*2=38", "then x2", "ok", "#### 38", "=5", "a b c"]) for _ in range(rng.randint(1, 5))
    ]
    text = "\n".join(lines)
    return text + rng.choice(["", "\n", "\n\n"])


# -- the whole path against a reference ------------------------------------------------------


def reference_token_advantages(tok, ids, values_by_state, cap, reward, gamma):
    """VinePPO written out plainly: steps end after each "\\n" (not at the very end), a token
    belongs to the step of its first character, trailing special tokens to the last step; the
    first ``cap`` states are valued and the rest filled backwards; A_j = r_j + gamma V_{j+1} - V_j."""
    special = set(tok.all_special_ids)
    n = len(ids)
    while n and ids[n - 1] in special:
        n -= 1
    content = ids[:n]
    text = tok.decode(content)
    points = [i + 1 for i, ch in enumerate(text) if ch == "\n" and i + 1 < len(text)]
    char_step = [sum(p <= c for p in points) for c in range(len(text))]
    token_start = [len(tok.decode(content[:k])) for k in range(n)]
    raw_step = [char_step[s] for s in token_start]
    steps = sorted(set(raw_step))  # a step in which no token starts has no state: it joins the previous
    token_step = [steps.index(s) for s in raw_step] + [len(steps) - 1] * (len(ids) - n)
    num = len(steps)
    values = [values_by_state[j] if cap is None or j < cap else None for j in range(num)]
    rewards = [0.0] * (num - 1) + [reward]
    following = 0.0
    for j in reversed(range(num)):
        if values[j] is None:
            values[j] = rewards[j] + gamma * following
        following = values[j]
    adv = [rewards[j] + gamma * (values[j + 1] if j + 1 < num else 0.0) - values[j] for j in range(num)]
    first_tokens = [token_step.index(j) for j in range(num)]
    return np.array([adv[s] for s in token_step]), first_tokens


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("cap", [None, 2])
@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_token_ids_to_advantages_match_the_reference(which, cap, gamma, byte_tok, bpe_tok):
    tok = byte_tok if which == "byte" else bpe_tok
    rng = random.Random(f"{which}{cap}{gamma}")
    checked_multichar = False
    for _ in range(25):
        ids = tok.encode(random_response(rng), add_special_tokens=False)
        ids += rng.choice([[], [tok.eos_token_id], [tok.eos_token_id, tok.pad_token_id]])
        checked_multichar |= any(len(tok.decode([i])) > 1 for i in ids if i not in tok.all_special_ids)
        # MC values from returns of K = 4 branches per valued state
        positions, valued = trajectory_states(ids, tok, ReplayConfig(max_states=cap))
        returns = [[rng.random() for _ in range(4)] if v else [] for v in valued]
        record = MCRecord("x", "full", 3, positions, returns)
        reward = rng.choice([0.0, 1.0])
        got = trajectory_advantages("full", len(ids), positions, record.stats.mean, reward, gamma)
        want, first_tokens = reference_token_advantages(
            tok, ids, [sum(r) / len(r) if r else None for r in returns], cap, reward, gamma
        )
        np.testing.assert_array_equal(positions, first_tokens)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=tok.decode(ids))
    assert which == "byte" or checked_multichar


def test_text_offsets_are_linear_and_equal_prefix_decoding(byte_tok, bpe_tok):
    rng = np.random.default_rng(0)
    utf8 = "héllo wörld €20 😀 ok\n".encode() * 12  # multi-byte characters split across tokens
    cases = [
        (byte_tok, list(utf8)),
        (byte_tok, rng.integers(0, 256, 300).tolist() + [byte_tok.eos_token_id]),
        (bpe_tok, bpe_tok.encode("12+30=42\nthen x2\n#### 84\n" * 20)),
    ]
    for tok, ids in cases:
        text, offsets = text_offsets(tok, ids)
        ends = np.maximum.accumulate(prefix_ends(tok, ids))
        assert text == tok.decode(ids) and len(ids) > 2 * 64
        np.testing.assert_array_equal([e for _, e in offsets], ends)
        np.testing.assert_array_equal([s for s, _ in offsets], np.concatenate([[0], ends[:-1]]))


# -- branches: horizon, stop tokens --------------------------------------------------------------

RESPONSE = b"2+3\n=5\nA: 5"


@pytest.fixture(scope="module")
def trajectory(tiny_model):
    seq = np.frombuffer(PROMPT + RESPONSE, dtype=np.uint8).astype(np.int32)[None]
    return seq, capture_state(tiny_model, seq, seq.shape[1])


def test_branch_budget_is_the_rollouts_remaining_horizon(tiny_model, byte_tok, trajectory, monkeypatch):
    import vinekv.replay.valuation as valuation

    seq, full = trajectory
    config = ReplayConfig(branches=6, max_tokens=100, horizon=14, seed=1, unfinished_reward=None)
    plan = plan_trajectory(list(RESPONSE), byte_tok, config)
    np.testing.assert_array_equal(plan.positions, [0, 4, 7])
    np.testing.assert_array_equal(config.branch_budgets(plan.positions), [14, 10, 7])
    np.testing.assert_array_equal(ReplayConfig(max_tokens=8, horizon=14).branch_budgets(plan.positions), [8, 8, 7])
    sampled = []

    def keep(*args, **kwargs):
        sampled.extend(generate_branches(*args, **kwargs))
        return sampled[-len(args[1]) :]

    monkeypatch.setattr(valuation, "generate_branches", keep)
    states = {int(b): full.prefix(len(PROMPT) + int(b)) for b in plan.positions}
    request = ValueRequest(list(RESPONSE), plan, states)
    (values,) = value_trajectories(tiny_model, byte_tok, even_fraction, config, [request])
    for b, branches in zip(plan.positions, sampled, strict=True):
        # a branch ends where the rollout's budget would: response[:b] ++ branch <= 14 tokens
        assert branches.lengths.max() <= 14 - b
        assert all(n == 14 - b for n, r in zip(branches.lengths, branches.finish_reasons, strict=True) if r == "length")
    assert any(r == "length" for br in sampled for r in br.finish_reasons)
    assert values.new_branches == 18 and values.new_tokens == sum(int(br.lengths.sum()) for br in sampled)


def test_branches_stop_on_every_eos_the_rollouts_stop_on(tiny_model, byte_tok, trajectory):
    from transformers import GenerationConfig

    _, full = trajectory
    state = full.prefix(len(PROMPT) + 4)
    params = SamplingParams(n=32, max_tokens=20, temperature=1.0)
    free = generate_branches(tiny_model, [state], params, seed=3, tokenizer=byte_tok)[0]
    common = np.bincount(np.concatenate(free.tokens), minlength=256)[:256].argmax()  # a byte it samples often
    saved = getattr(tiny_model, "generation_config", None)
    tiny_model.generation_config = GenerationConfig(eos_token_id=[byte_tok.eos_token_id, int(common)])
    try:
        stopped = generate_branches(tiny_model, [state], params, seed=3, tokenizer=byte_tok)[0]
    finally:
        tiny_model.generation_config = saved
    ended = [t for t, r in zip(stopped.tokens, stopped.finish_reasons, strict=True) if r == "eos"]
    assert ended and all(t[-1] in (common, byte_tok.eos_token_id) for t in ended)
    assert not any(np.isin(t[:-1], [common]).any() for t in stopped.tokens)


# -- adaptive K and extending K -------------------------------------------------------------------


def even_fraction(prompts, completions, **kwargs):
    return [sum(b % 2 == 0 for b in c.encode()) / max(1, len(c.encode())) for c in completions]


def constant(prompts, completions, **kwargs):
    return [1.0] * len(completions)


@pytest.fixture(scope="module")
def stored(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("fidelity") / "store"
    with SnapshotStore.open(path, codec="lossless") as store:
        for i, response in enumerate([RESPONSE, b"x\ny", b"A: 5"]):
            seq = np.frombuffer(PROMPT + response, dtype=np.uint8).astype(np.int32)[None]
            store.spill("r", f"t{i}", capture_state(tiny_model, seq, seq.shape[1]), len(PROMPT))
    return path


def records(store: SnapshotStore) -> dict[str, MCRecord]:
    return {t: MCRecord.from_fields(store.trajectory_info("r", t)["fields"]["mc"]) for t in store.trajectories("r")}


def test_adaptive_k_stops_settled_states_and_samples_uncertain_ones(tiny_model, byte_tok, stored, tmp_path):
    config = ReplayConfig(branches=4, max_branches=12, adaptive_ci=0.05, max_tokens=6, seed=2, unfinished_reward=None)
    for reward, expect in ((constant, "first round"), (even_fraction, "cap")):
        path = tmp_path / reward.__name__
        shutil.copytree(stored, path)
        with SnapshotStore.open(path) as store:
            report = replay_run(store, "r", tiny_model, byte_tok, reward, config, progress=False)
            counts = np.concatenate([r.stats.count for r in records(store).values()])
            first = [r.stats.count[0] for r in records(store).values()]  # the prompt state's K, equal in all three
        # 6 states, 4 distinct: the three responses share the prompt state, valued once
        assert (report.states, report.sampled_states) == (6, 4)
        if expect == "first round":  # every return equal: half-width 0 after the first round
            assert set(counts.tolist()) == {4} and report.branches == 4 * report.sampled_states
        else:  # returns disagree: rounds of 4 up to the cap of 12
            assert counts.max() == 12 and set(counts.tolist()) <= {4, 8, 12}
            assert len(set(first)) == 1 and report.branches == counts.sum() - 2 * first[0]
        assert sorted(report.branches_per_state) == sorted(counts.tolist())


def test_more_branches_later_equal_a_fresh_run(tiny_model, byte_tok, stored, tmp_path):
    extended, fresh = tmp_path / "extended", tmp_path / "fresh"
    shutil.copytree(stored, extended)
    shutil.copytree(stored, fresh)
    base = ReplayConfig(branches=4, max_tokens=6, seed=5)
    with SnapshotStore.open(extended) as store:
        replay_run(store, "r", tiny_model, byte_tok, even_fraction, base, progress=False)
        report = replay_run(
            store,
            "r",
            tiny_model,
            byte_tok,
            even_fraction,
            ReplayConfig(**{**base.__dict__, "branches": 8}),
            progress=False,
        )
        got = records(store)
    assert report.branches == 4 * report.sampled_states  # only branches 4..7 were sampled
    with SnapshotStore.open(fresh) as store:
        replay_run(
            store,
            "r",
            tiny_model,
            byte_tok,
            even_fraction,
            ReplayConfig(**{**base.__dict__, "branches": 8}),
            progress=False,
        )
        want = records(store)
    for tid in want:
        assert got[tid].returns == want[tid].returns and got[tid].branch_tokens == want[tid].branch_tokens
        np.testing.assert_array_equal(got[tid].stats.mean, want[tid].stats.mean)
        assert set(got[tid].stats.count.tolist()) == {8}


# -- entropy-ranked states ------------------------------------------------------------------------


def test_entropy_recorded_at_capture_and_used_for_selection(tiny_model, byte_tok):
    seqs = [np.frombuffer(PROMPT + r, dtype=np.uint8).astype(np.int32) for r in (RESPONSE, b"ab\ncd\nef\ngh")]
    for seq, (_, entropy) in zip(seqs, capture_with_entropy(tiny_model, seqs, batch_rows=2), strict=True):
        logits = no_cache_logits(tiny_model, seq[None])[0].astype(np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        np.testing.assert_allclose(entropy, -(np.exp(logp) * logp).sum(-1), rtol=1e-4, atol=1e-5)
    ids = list(b"ab\ncd\nef\ngh")  # step starts 0, 3, 6, 9
    entropy = np.zeros(len(ids))
    entropy[[3, 6, 9]] = [0.5, 2.0, 1.0]
    config = ReplayConfig(max_states=2, state_selection="entropy")
    positions, valued = trajectory_states(ids, byte_tok, config, entropy=entropy)
    np.testing.assert_array_equal(positions[valued], [0, 6])


def test_a_replay_of_mostly_truncated_branches_warns(tiny_model, byte_tok, stored, tmp_path, caplog):
    path = tmp_path / "short"
    shutil.copytree(stored, path)
    with SnapshotStore.open(path) as store, caplog.at_level("WARNING", logger="vinekv.replay.branch_replay"):
        report = replay_run(
            store, "r", tiny_model, byte_tok, constant, ReplayConfig(branches=2, max_tokens=2), progress=False
        )
    assert report.unfinished > report.branches / 2
    assert "cut off by their token budget" in caplog.text and "unfinished_reward=0.0" in caplog.text
    caplog.clear()
    shutil.rmtree(path)
    shutil.copytree(stored, path)
    with SnapshotStore.open(path) as store, caplog.at_level("WARNING", logger="vinekv.replay.branch_replay"):
        replay_run(
            store,
            "r",
            tiny_model,
            byte_tok,
            constant,
            ReplayConfig(branches=2, max_tokens=2, unfinished_reward=None),
            progress=False,
        )
    assert "cut off" not in caplog.text  # scored as they are: nothing silently zeroed
