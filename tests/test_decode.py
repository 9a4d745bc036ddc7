"""Decoding continued from a resumed snapshot reproduces uninterrupted decoding token for token."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import get_model, no_cache_logits

from vinekv.kvstore import extract_state, resume_from_state
from vinekv.replay import decode, prefill, row_keys_for, sample_tokens
from vinekv.replay.decode import Sampling, decode_rows

PROMPT_LENS = np.array([9, 14, 5])
NEW = 16


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_resumed_decoding_matches_uninterrupted(family, temperature):
    model = get_model(family, "float32")
    prompts = np.random.default_rng(3).integers(0, 256, size=(3, 14)).astype(np.int32)
    keys = row_keys_for(11, 3)
    cache, logits = prefill(model, prompts, PROMPT_LENS, max_length=14 + NEW)
    out = decode(model, cache, logits, NEW, temperature=temperature, row_keys=keys)
    full = [np.concatenate([prompts[b, : PROMPT_LENS[b]], out.tokens[b]]) for b in range(3)]
    padded = np.zeros((3, 14 + NEW), np.int32)
    for b in range(3):
        padded[b, : len(full[b])] = full[b]

    for b in range(3):
        if temperature == 0.0:  # greedy really follows the model: argmax of a no-cache forward
            ref = no_cache_logits(model, full[b][None, :-1])[0, PROMPT_LENS[b] - 1 :]
            np.testing.assert_array_equal(ref.argmax(-1), out.tokens[b])
        for t in (int(PROMPT_LENS[b]), int(PROMPT_LENS[b]) + 6):
            # Snapshot straight from the live cache of the whole batch, then resume and continue.
            state = extract_state(model, out.cache, padded, t, rows=[b])
            logits, cache = resume_from_state(model, state, full[b][None, t : t + 1], max_length=40)
            rest = decode(
                model, cache, logits[:, -1], len(full[b]) - t - 1, temperature=temperature, row_keys=keys[b : b + 1]
            )
            np.testing.assert_array_equal(rest.tokens[0], full[b][t + 1 :])


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(1.0, 8, 0.9, "generate"), Sampling(0.7, 0, 0.8, "esurge")])
def test_device_loop_matches_a_token_by_token_host_loop(sampling):
    """`decode_rows` (one `lax.while_loop` on the device) draws the tokens, ends and log-probs a
    plain host loop of `sample_tokens` + one-token forwards gives, row budgets and stops included."""
    import jax

    from vinekv.kvstore.dense_cache import forward_chunk

    model = get_model("llama", "float32")
    prompts = np.random.default_rng(5).integers(0, 256, size=(3, 14)).astype(np.int32)
    keys = row_keys_for(7, 3)
    budgets = np.array([16, 5, 11])
    cache, logits = prefill(model, prompts, PROMPT_LENS, max_length=14 + NEW)
    first = jax.device_get(logits).argmax(-1)  # greedy's first tokens: as stop ids, rows must end on them
    eos, stop = [int(first[0]), 300], [int(first[2])]
    out = decode_rows(model, cache, logits, budgets, keys, sampling, eos_ids=eos, stop_ids=stop)

    cache, logits = prefill(model, prompts, PROMPT_LENS, max_length=14 + NEW)
    tokens, logprobs = np.zeros((3, NEW), np.int32), np.zeros((3, NEW), np.float32)
    lengths, ended = budgets.copy(), ["length"] * 3
    done = np.zeros(3, bool)
    for i in range(int(budgets.max())):
        positions = cache.views[0].indexs
        tok, lp = sample_tokens(logits, keys, positions, *dataclasses.astuple(sampling))
        tokens[:, i], logprobs[:, i] = jax.device_get((tok, lp))
        for r in range(3):
            reason = "eos" if tokens[r, i] in eos else "stop" if tokens[r, i] in stop else None
            if not done[r] and reason:
                lengths[r], ended[r] = i + 1, reason
            done[r] |= bool(reason) or i + 1 >= budgets[r]
        if done.all():
            break
        logits, cache = forward_chunk(model, cache, tok[:, None])
        logits = logits[:, -1]
    assert out.lengths.tolist() == lengths.tolist() and out.ended_by == ended
    if sampling.temperature == 0.0:
        assert ended[0] == "eos" and ended[2] == "stop"
    for r in range(3):
        np.testing.assert_array_equal(out.tokens[r, : lengths[r]], tokens[r, : lengths[r]])
        np.testing.assert_allclose(out.logprobs[r, : lengths[r]], logprobs[r, : lengths[r]], rtol=1e-6, atol=1e-6)
