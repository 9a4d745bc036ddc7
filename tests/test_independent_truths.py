"""Checks against independent truths: plain forwards, codec math done by hand, numpy sampling
references, EasyDeL's own warpers and masks, hand-written advantage formulas, uninterrupted runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import get_model, no_cache_logits
from easydel.inference.sampling_params import SamplingParams
from trainer_kit import (
    GROUP,
    PROMPTS,
    even_bytes,
    fresh_model,
    left_padded_tokenizer,
    make_trainer,
    prompt_batch,
)
from transformers import GenerationConfig

from vinekv.kvstore import SnapshotStore, capture_sequences, capture_state, get_codec, resume_from_state
from vinekv.kvstore.codecs.int8 import QMAX
from vinekv.models import BYTE_VOCAB
from vinekv.replay.decode import SAMPLERS, sample_tokens, truncated_logits
from vinekv.replay.sampler import generate_branches
from vinekv.replay.values import MCRecord
from vinekv.trainer import vineppo_trainer as vineppo_module
from vinekv.trainer.advantages import grpo_advantages, trajectory_advantages

ATOL = 1e-5


# -- 1. capture_sequences: ragged rows padded into one chunk ----------------------------------


def test_capture_sequences_ragged_chunk_equals_single_capture_and_plain_forward(tiny_model):
    """Attention runs in the model's dtype (`build_model` sets attn_dtype): with EasyDeL's default
    bfloat16 attention a 20-token row padded to 64 gave K/V 4e-5 and logits 2e-4 off."""
    model = tiny_model
    rng = np.random.default_rng(11)
    seqs = [rng.integers(0, 256, size=n).astype(np.int32) for n in (70, 20, 5)]  # 70 spans two 64-buckets
    states = list(capture_sequences(model, seqs, batch_rows=4))  # one chunk: 3 rows + 1 empty, width 128
    assert len(states) == 3
    for seq, state, ts in zip(seqs, states, [(33, 64, 65), (13,), (3,)], strict=True):
        n = len(seq)
        assert state.batch == 1 and state.position == n, (state.batch, state.position, n)
        np.testing.assert_array_equal(state.token_ids, seq[None])
        single = capture_state(model, seq[None], n)
        np.testing.assert_allclose(state.keys, single.keys, atol=1e-6, rtol=0, err_msg=f"keys, length {n}")
        np.testing.assert_allclose(state.values, single.values, atol=1e-6, rtol=0, err_msg=f"values, length {n}")
        full = no_cache_logits(model, seq[None])
        for t in ts:
            logits, _ = resume_from_state(model, state.prefix(t), seq[None, t:])
            np.testing.assert_allclose(
                np.asarray(logits), full[:, t:], atol=ATOL, rtol=0, err_msg=f"resume at {t} of length {n}"
            )


# -- 2. bf16 KV through the lossless store ---------------------------------------------------


def test_bf16_kv_round_trips_bit_exactly_and_zarr_reads_it(tmp_path):
    import ml_dtypes
    import zarr

    model = get_model("llama", "bfloat16")
    rng = np.random.default_rng(5)
    seq = rng.integers(0, 256, size=(1, 100)).astype(np.int32)
    plen = 30
    state = capture_state(model, seq, 100)
    assert state.keys.dtype == ml_dtypes.bfloat16
    path = tmp_path / "s"
    with SnapshotStore.open(path, codec="lossless") as store:
        store.spill("r0", "t0", state, plen)
        store.flush()
        for t in (7, plen, 64, 65, 99):
            got = store.read_prefix("r0", "t0", t, model=model)
            assert got.keys.dtype == ml_dtypes.bfloat16 and got.position == t
            for name in ("keys", "values"):
                np.testing.assert_array_equal(
                    getattr(got, name).view(np.uint16),
                    getattr(state, name)[:, :, :t].view(np.uint16),
                    err_msg=f"{name} bits at t={t}",
                )
            cont = seq[:, t : t + 1]
            from_store, _ = resume_from_state(model, got, cont)
            in_memory, _ = resume_from_state(model, state.prefix(t), cont)
            np.testing.assert_array_equal(np.asarray(from_store), np.asarray(in_memory), err_msg=f"logits at t={t}")
    group = zarr.open_group(str(path), mode="r")
    assert group.attrs["vinekv"]["format"] == "vinekv.kvstore"
    node = group["runs"]["r0"]["trajectories"]["t0"]
    prompt = group["runs"]["r0"]["prompts"][node.attrs["vinekv"]["prompt"]]
    kv = np.concatenate([prompt["kv"][:], node["kv"][:]], axis=2)
    assert kv.dtype == np.uint16  # bfloat16 bit patterns
    np.testing.assert_array_equal(kv[:, 0], state.keys[:, 0].view(np.uint16))
    np.testing.assert_array_equal(kv[:, 1], state.values[:, 0].view(np.uint16))


# -- 3. prefix reads across several store chunks ---------------------------------------------

LONG, LONG_PROMPT = 230, 40
READ_AT = (1, 39, 40, 41, 63, 64, 65, 103, 104, 105, 130, 167, 168, 169, 200, LONG)


@pytest.fixture(scope="module")
def long_trajectory(tiny_model):
    seq = np.random.default_rng(3).integers(0, 256, size=(1, LONG)).astype(np.int32)
    return seq, capture_state(tiny_model, seq, LONG)


@pytest.mark.parametrize("codec", ["lossless", "int8"])
def test_prefix_reads_across_chunks(tmp_path, tiny_model, long_trajectory, codec):
    seq, state = long_trajectory
    keys, values = state.keys[:, 0], state.values[:, 0]
    if codec == "int8":  # the codec applied directly to the whole trajectory (scales are per token)
        c = get_codec("int8")
        encoded = {name: arr.data for name, arr in c.encode(keys, values).items()}
        expected = c.decode(encoded, "float32", np.float32)
        exact = np.stack([keys, values], axis=1)
        absmax = np.abs(exact).max(-1, keepdims=True)
        bound = 0.5 * absmax / QMAX * (1 + 2**-10) + absmax * 2**-10  # scale/2 + float16 rounding of the scale
        assert (np.abs(expected - exact) <= bound + 1e-12).all(), "direct int8 round trip beyond its documented error"
    else:
        expected = np.stack([keys, values], axis=1)
    with SnapshotStore.open(tmp_path / "s", codec=codec, chunk_tokens=64) as store:
        store.spill("r0", "t0", state, LONG_PROMPT)
        store.flush()
        for t in READ_AT:
            got = store.read_prefix("r0", "t0", t, model=tiny_model)
            assert got.position == t
            np.testing.assert_array_equal(got.token_ids, seq[:, :t])
            np.testing.assert_array_equal(got.keys[:, 0], expected[:, 0, :t], err_msg=f"{codec} keys at t={t}")
            np.testing.assert_array_equal(got.values[:, 0], expected[:, 1, :t], err_msg=f"{codec} values at t={t}")
            if codec == "lossless":
                ref = state.prefix(t)
                np.testing.assert_array_equal(got.keys, ref.keys)
                np.testing.assert_array_equal(got.values, ref.values)


# -- 4. multi-token stop strings -------------------------------------------------------------


def _first_pair_end(tokens: np.ndarray, pair: tuple[int, int]) -> int | None:
    """Length of ``tokens`` up to and including the first occurrence of ``pair``, or None."""
    hits = np.flatnonzero((tokens[:-1] == pair[0]) & (tokens[1:] == pair[1]))
    return int(hits[0]) + 2 if hits.size else None


def test_multi_token_stop_string(tiny_model, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prompt = np.frombuffer(b"Q: 12+30?\nA:", dtype=np.uint8).astype(np.int32)[None]
    state = capture_state(tiny_model, prompt, prompt.shape[1])
    common = dict(n=64, max_tokens=30, temperature=1.0)
    free = generate_branches(tiny_model, [state], SamplingParams(**common), tokenizer=tok, seed=4)[0]
    # the stop strings: the three alphanumeric byte pairs found in the most unconstrained branches
    alnum = {ord(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"}
    seen: dict[tuple[int, int], int] = {}
    for tokens in free.tokens:
        adjacent = {(int(a), int(b)) for a, b in zip(tokens[:-1], tokens[1:], strict=True) if a in alnum and b in alnum}
        for p in adjacent:
            seen[p] = seen.get(p, 0) + 1
    assert seen, "no alphanumeric byte pair in 64 x 30 sampled tokens"
    pairs = sorted(sorted(seen), key=lambda p: -seen[p])[:3]
    stops = [chr(a) + chr(b) for a, b in pairs]
    assert all(len(tok.encode(s, add_special_tokens=False)) == 2 for s in stops)

    params = SamplingParams(**common, stop=stops)
    stopped = generate_branches(tiny_model, [state], params, tokenizer=tok, seed=4)[0]
    assert stopped.finish_reasons.count("stop") >= 2, (stops, stopped.finish_reasons)
    for k, (tokens, reason, before) in enumerate(zip(stopped.tokens, stopped.finish_reasons, free.tokens, strict=True)):
        text = tok.decode(tokens.tolist(), skip_special_tokens=True)
        ends = [e for e in (_first_pair_end(before, p) for p in pairs) if e is not None]
        end = min(ends) if ends else None  # where the unconstrained branch first completes a stop string
        found = {s: text.count(s) for s in stops if s in text}
        if reason == "stop":
            assert len(found) == 1 and list(found.values()) == [1], f"branch {k}: {text!r} holds {found}"
            assert text.endswith(next(iter(found))), f"branch {k}: {text!r} does not end with its stop string"
            assert end == len(tokens), f"branch {k} stopped after {len(tokens)} tokens, the first stop ends at {end}"
            np.testing.assert_array_equal(tokens, before[: len(tokens)])
        else:
            assert not found, f"branch {k} ({reason}) contains {found}: {text!r}"
            assert end is None, f"branch {k} ({reason}) ran past a stop string ending at token {end}"
            np.testing.assert_array_equal(tokens, before)
            assert reason == free.finish_reasons[k]
            if reason == "length":
                assert len(tokens) == 30


# -- 5. sampling against numpy references and EasyDeL's own implementations -------------------


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.where(np.isfinite(x), np.exp(x), 0.0)
    return e / e.sum(-1, keepdims=True)


def _top_k_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Keep tokens at least as large as the k-th largest (ties kept)."""
    if not k or k >= x.shape[-1]:
        return np.ones(x.shape, bool)
    kth = -np.sort(-x, axis=-1)[:, k - 1 : k]
    return x >= kth


def numpy_kept(logits: np.ndarray, temperature: float, top_k: int, top_p: float, sampler: str) -> np.ndarray:
    """``[B, V]`` bool: the tokens the sampler may draw, computed row by row in float64."""
    x = logits.astype(np.float64)
    if sampler == "generate":
        x = x / temperature
    keep = _top_k_mask(x, top_k)
    if top_p < 1.0:
        probs = _softmax(np.where(keep, x, -np.inf))
        for b in range(x.shape[0]):
            if sampler == "generate":
                order = sorted(range(x.shape[1]), key=lambda i: (-x[b, i] if keep[b, i] else np.inf, i))
                mass = 0.0
                for i in order:
                    keep[b, i] &= mass < top_p
                    mass += probs[b, i]
            else:
                for i in range(x.shape[1]):
                    keep[b, i] &= probs[b][probs[b] > probs[b, i]].sum() < top_p
    return keep


def numpy_truncated_probs(logits, temperature, top_k, top_p, sampler) -> np.ndarray:
    keep = numpy_kept(logits, temperature, top_k, top_p, sampler)
    return _softmax(np.where(keep, logits.astype(np.float64) / temperature, -np.inf))


def _tied_logits(seed: int, rows: int = 24, vocab: int = 24) -> np.ndarray:
    """Logits on a coarse grid (many exact ties), plus a few rows of plain normals."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(-4, 5, size=(rows, vocab)).astype(np.float32) * 0.5
    return np.concatenate([grid, rng.normal(size=(8, vocab)).astype(np.float32) * 2])


def test_tie_rules_of_the_samplers_differ_on_these_logits():
    """At T=1 the samplers differ only in top-p ties at the boundary: the tied grid must hit that."""
    logits = _tied_logits(0)
    for top_p in (0.6, 0.95):
        generate, esurge = (numpy_kept(logits, 1.0, 0, top_p, s) for s in SAMPLERS)
        assert np.all(generate <= esurge) and np.any(generate != esurge), top_p


@pytest.mark.parametrize("sampler", ["generate", "esurge"])
def test_truncated_logits_match_numpy_including_ties(sampler):
    logits = _tied_logits(0)
    for temperature in (0.4, 1.0, 1.7):
        for top_k in (0, 1, 5):
            for top_p in (1.0, 0.6, 0.95):
                got = np.asarray(
                    jax.nn.softmax(truncated_logits(jnp.asarray(logits), temperature, top_k, top_p, sampler))
                )
                want = numpy_truncated_probs(logits, temperature, top_k, top_p, sampler)
                np.testing.assert_allclose(
                    got, want, atol=1e-6, rtol=0, err_msg=f"{sampler} T={temperature} top_k={top_k} top_p={top_p}"
                )


SAMPLE_SETTINGS = [(0, 1.0), (5, 1.0), (0, 0.6), (8, 0.9)]


@pytest.mark.parametrize("sampler", ["generate", "esurge"])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
@pytest.mark.parametrize(("top_k", "top_p"), SAMPLE_SETTINGS)
def test_sample_tokens_logprobs_and_support(sampler, temperature, top_k, top_p):
    rng = np.random.default_rng(1)
    rows, vocab = 256, 32
    logits = rng.normal(size=(rows, vocab)).astype(np.float32) * 2
    logits[:16] = np.round(logits[:16])  # some exact ties too
    keys = jax.random.split(jax.random.PRNGKey(3), rows)
    positions = jnp.arange(rows, dtype=jnp.int32) + 17
    tokens, logprobs = sample_tokens(jnp.asarray(logits), keys, positions, temperature, top_k, top_p, sampler)
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    scaled = logits.astype(np.float64) / temperature
    top = scaled.max(-1, keepdims=True)
    log_softmax = scaled - top - np.log(np.exp(scaled - top).sum(-1, keepdims=True))
    np.testing.assert_allclose(logprobs, log_softmax[np.arange(rows), tokens], atol=ATOL, rtol=0)
    kept = numpy_kept(logits, temperature, top_k, top_p, sampler)
    outside = np.flatnonzero(~kept[np.arange(rows), tokens])
    assert outside.size == 0, f"rows {outside.tolist()} sampled tokens outside the truncated support"


@pytest.mark.parametrize("sampler", ["generate", "esurge"])
def test_sampling_frequencies_follow_the_truncated_distribution(sampler):
    """One row of logits drawn with many keys: counts within 5 sigma of the numpy probabilities."""
    rng = np.random.default_rng(2)
    vocab, draws, temperature, top_k, top_p = 12, 20000, 0.8, 8, 0.9
    row = rng.normal(size=(1, vocab)).astype(np.float32)
    logits = jnp.asarray(np.repeat(row, draws, 0))
    keys = jax.random.split(jax.random.PRNGKey(9), draws)
    tokens, _ = sample_tokens(logits, keys, jnp.zeros(draws, jnp.int32), temperature, top_k, top_p, sampler)
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    p = numpy_truncated_probs(row, temperature, top_k, top_p, sampler)[0]
    sigma = np.sqrt(draws * p * (1 - p)) + 1e-9
    assert np.all(counts[p == 0] == 0), counts
    assert np.all(np.abs(counts - draws * p) <= 5 * sigma + 1), (counts.tolist(), (draws * p).round(1).tolist())


def _well_separated_logits(seed: int, rows: int = 32, vocab: int = 40) -> np.ndarray:
    """Float32 logits whose sorted values differ by at least 0.05 (no near ties)."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, vocab), np.float32)
    for b in range(rows):
        values = np.cumsum(rng.uniform(0.05, 0.4, size=vocab)) - 4
        out[b] = rng.permutation(values)
    return out


@pytest.mark.parametrize("temperature", [0.4, 1.0, 1.7])
def test_kept_sets_equal_easydel_warpers_and_esurge_masks(temperature):
    from easydel.inference.esurge.core.binary_search import apply_topk_mask, apply_topp_mask
    from easydel.inference.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = _well_separated_logits(4)
    x = jnp.asarray(logits)
    ids = jnp.zeros((x.shape[0], 1), jnp.int32)
    for top_k in (0, 1, 5):
        for top_p in (1.0, 0.6, 0.95):
            where = f"T={temperature} top_k={top_k} top_p={top_p}"
            ours = {s: np.isfinite(np.asarray(truncated_logits(x, temperature, top_k, top_p, s))) for s in SAMPLERS}
            # generate: EasyDeL's warpers in Hugging Face's order
            scores = TemperatureLogitsWarper(temperature=jnp.asarray(temperature, jnp.float32))(ids, x, 1)
            scores = TopKLogitsWarper(top_k=top_k)(ids, scores, 1)
            scores = TopPLogitsWarper(top_p=top_p)(ids, scores, 1)
            np.testing.assert_array_equal(
                ours["generate"], np.isfinite(np.asarray(scores)), err_msg=f"generate {where}"
            )
            # esurge: eSurge's binary-search masks, then the temperature
            masked = x
            if top_k:
                masked = apply_topk_mask(masked, jnp.asarray(top_k, jnp.int32), -1e10)
            if top_p < 1.0:
                masked = apply_topp_mask(masked, jnp.asarray(top_p, jnp.float32), -1e10)
            masked = np.asarray(masked / temperature)
            np.testing.assert_array_equal(ours["esurge"], masked > -1e9, err_msg=f"esurge {where}")
            # and both equal the numpy reference
            for s in SAMPLERS:
                np.testing.assert_array_equal(ours[s], numpy_kept(logits, temperature, top_k, top_p, s), err_msg=s)


# -- 6./7. trainer advantages against separately computed ones ---------------------------------

K = 2  # branches per state (trainer_kit's vineppo_branches)


@pytest.fixture(scope="module")
def tokenizer():
    return left_padded_tokenizer()


def run_recorded(tr, tokenizer, monkeypatch):
    """Preprocesses one batch, recording the rollouts, MC records and rewards the trainer used."""
    seen = {"rollouts": None, "values": None, "rewards": None}
    real_estimate, real_score = vineppo_module.estimate_values, tr._score_rollouts

    def estimate(*args, **kwargs):
        values, stats = real_estimate(*args, **kwargs)
        seen["rollouts"], seen["values"] = list(args[4]), values
        return values, stats

    def score(rollouts, fields):
        seen["rewards"] = np.array(real_score(rollouts, fields))
        return seen["rewards"]

    monkeypatch.setattr(vineppo_module, "estimate_values", estimate)
    tr._score_rollouts = score
    out, metrics = tr._preprocess_batch_input(tr.model_state, prompt_batch(tokenizer), is_train=True)
    out = {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
    return out, metrics, seen


def reference_full_advantages(response_len, starts, values, reward, gamma) -> np.ndarray:
    """A_j = r_j + gamma * V_{j+1} - V_j (V_S = 0, NaN values filled backwards), per token of step j."""
    steps = len(starts)
    r = [0.0] * steps
    r[-1] = reward
    v = [float(x) for x in values]
    following = 0.0
    for j in reversed(range(steps)):
        if v[j] != v[j]:  # NaN: not estimated
            v[j] = r[j] + gamma * following
        following = v[j]
    out = np.zeros(response_len)
    bounds = [int(s) for s in starts] + [response_len]
    for j in range(steps):
        nxt = v[j + 1] if j + 1 < steps else 0.0
        out[bounds[j] : bounds[j + 1]] = r[j] + gamma * nxt - v[j]
    return out


def check_full_rows(out, seen, tokenizer, gamma):
    """Every completion row: its rollout, reward and advantages recomputed independently."""
    ids, mask, adv = out["completion_ids"], out["completion_mask"].astype(bool), out["advantages"]
    kept = np.flatnonzero(mask.any(1))
    rollouts, values, rewards = seen["rollouts"], seen["values"], seen["rewards"]
    assert [r.row for r in rollouts] == kept.tolist(), "rollouts are not the rows with unmasked tokens"
    assert len(values) == len(rollouts) == len(rewards)
    for rollout, record, reward in zip(rollouts, values, rewards, strict=True):
        row = rollout.row
        n = int(mask[row].sum())
        response = ids[row, :n]
        np.testing.assert_array_equal(rollout.response_ids, response)
        assert mask[row, :n].all() and not mask[row, n:].any()
        text = tokenizer.decode(response.tolist(), skip_special_tokens=True)
        assert reward == pytest.approx(even_bytes(None, [text])[0], abs=1e-12), f"row {row} reward"
        assert isinstance(record, MCRecord) and record.response_positions[0] == 0
        mean = record.stats.mean
        counts = record.stats.count
        assert set(counts.tolist()) <= {0, K} and np.all(np.isnan(mean) == (counts == 0))
        expected = reference_full_advantages(n, record.response_positions, mean, float(reward), gamma)
        library = trajectory_advantages("full", n, record.response_positions, mean, float(reward), gamma)
        np.testing.assert_allclose(library, expected, atol=1e-12, rtol=0, err_msg=f"row {row}: trajectory_advantages")
        np.testing.assert_allclose(adv[row, :n], expected, atol=1e-6, rtol=0, err_msg=f"row {row}: trainer")
        assert np.all(adv[row, n:] == 0)
    others = np.setdiff1d(np.arange(ids.shape[0]), kept)
    assert np.all(adv[others] == 0), "rows without a rollout have advantages"
    return kept


def distinct_valued_states(seen) -> int:
    """Valued states with distinct tokens (prompt + response prefix): each is sampled once."""
    return len(
        {
            (*r.prompt_ids.tolist(), -1, *r.response_ids[:b].tolist())
            for r, v in zip(seen["rollouts"], seen["values"], strict=True)
            for b, count in zip(v.response_positions, v.stats.count, strict=True)
            if count > 0
        }
    )


def test_full_mode_trainer_advantages_equal_independent_ones(tmp_path, tokenizer, monkeypatch):
    gamma = 0.9
    tr = make_trainer(
        tmp_path, tokenizer, fresh_model(), vineppo_mode="full", vineppo_gamma=gamma, vineppo_max_states=2
    )
    out, metrics, seen = run_recorded(tr, tokenizer, monkeypatch)
    kept = check_full_rows(out, seen, tokenizer, gamma)
    assert kept.size == len(PROMPTS) * GROUP  # nothing masked without mask_truncated_completions
    unvalued = sum(int((v.stats.count == 0).sum()) for v in seen["values"])
    assert unvalued > 0, "no state beyond the cap: the NaN back-fill was not exercised"
    assert np.abs(out["advantages"]).max() > 0
    states = sum(int((v.stats.count > 0).sum()) for v in seen["values"])
    assert metrics["vineppo/states"] == states
    sampled = distinct_valued_states(seen)
    assert sampled <= states - len(PROMPTS) * (GROUP - 1)  # a group's prompt state at least is shared
    assert metrics["vineppo/sampled_states"] == sampled and metrics["vineppo/branches"] == K * sampled


def test_off_mode_trainer_advantages_are_grpo_advantages(tmp_path, tokenizer, monkeypatch):
    tr = make_trainer(tmp_path, tokenizer, fresh_model(), vineppo_mode="off")
    out, _, seen = run_recorded(tr, tokenizer, monkeypatch)
    assert seen["values"] is None, "vineppo_mode='off' estimated MC values"
    ids, mask, adv = out["completion_ids"], out["completion_mask"].astype(bool), out["advantages"]
    texts = [tokenizer.decode(ids[i, : mask[i].sum()].tolist(), skip_special_tokens=True) for i in range(len(ids))]
    rewards = np.array(even_bytes(None, texts))
    expected = grpo_advantages(rewards, GROUP)
    assert np.abs(expected).max() > 0.1
    for i in range(len(ids)):
        np.testing.assert_allclose(adv[i][mask[i]], expected[i], rtol=1e-4, atol=1e-5, err_msg=f"row {i}")
        assert np.all(adv[i][~mask[i]] == 0)


def _frequent_tokens(model, target: float = 0.045) -> list[int]:
    """Byte tokens the model samples often: the fewest whose mean next-token probability (over the
    positions of the prompts and random continuations) sums to ``target``."""
    rng = np.random.default_rng(0)
    rows = [list(p.encode()) + rng.integers(0, 256, size=16).tolist() for p in PROMPTS]
    width = max(map(len, rows))
    ids = np.array([r + r[: width - len(r)] for r in rows], np.int32)
    probs = _softmax(no_cache_logits(model, ids)[:, 8:].reshape(-1, model.config.vocab_size).astype(np.float64))
    mean = probs.mean(0)[:BYTE_VOCAB]
    order = np.argsort(-mean)
    return order[: int(np.searchsorted(np.cumsum(mean[order]), target)) + 1].tolist()


def test_mask_truncated_completions_mixes_kept_and_masked_rows(tmp_path, tokenizer, monkeypatch):
    model = fresh_model()
    extra = _frequent_tokens(model)
    eos = [BYTE_VOCAB, *extra]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=BYTE_VOCAB + 1, do_sample=True)
    tr = make_trainer(tmp_path, tokenizer, model, vineppo_mode="full", mask_truncated_completions=True)
    assert set(eos) <= set(tr.rollout_stop_ids)
    out, metrics, seen = run_recorded(tr, tokenizer, monkeypatch)
    ids, mask, adv = out["completion_ids"], out["completion_mask"].astype(bool), out["advantages"]
    kept = mask.any(1)
    has_eos = np.isin(ids, eos).any(1)
    np.testing.assert_array_equal(kept, has_eos, err_msg="kept rows are not exactly the rows that reached an EOS")
    assert kept.any() and not kept.all(), f"need both kept and masked rows, kept: {kept.tolist()}"
    assert np.all(adv[~kept] == 0)
    check_full_rows(out, seen, tokenizer, 1.0)
    assert {r.row for r in seen["rollouts"]} == set(np.flatnonzero(kept).tolist()), "masked rows got states"
    assert np.any(adv[kept] != 0)
    states = sum(int((v.stats.count > 0).sum()) for v in seen["values"])
    assert states >= kept.sum()
    assert metrics["vineppo/states"] == states
    assert metrics["vineppo/branches"] == K * distinct_valued_states(seen)
