"""Snapshot/resume exactness: resumed logits equal a no-cache forward over prefix ++ continuation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import get_model, no_cache_logits

from vinekv.kvstore import cache_from_states, capture_state, extract_state, forward_chunk, kv_layout, resume_from_state

ATOL = 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("position", [1, 16, 32])
@pytest.mark.parametrize("n", [1, 8])
def test_resume_matches_no_cache_forward(family, kv_dtype, position, n, token_seq):
    model = get_model(family, kv_dtype)
    prompt = token_seq[:, :32]
    state = capture_state(model, prompt, position)
    assert state.position == position and state.batch == 2
    assert str(state.keys.dtype) == kv_dtype == state.layout.dtype
    np.testing.assert_array_equal(state.token_ids, prompt[:, :position])

    continuation = token_seq[:, position : position + n]
    logits, cache = resume_from_state(model, state, continuation)
    expected = no_cache_logits(model, token_seq[:, : position + n])[:, position:]
    assert logits.shape == (2, n, kv_layout(model).vocab_size)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=ATOL, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.views[0].indexs), [position + n] * 2)


def test_resume_into_longer_cache_and_keep_decoding(tiny_model, token_seq):
    """A fresh cache of another max_length; then a second multi-token chunk continues from it."""
    state = capture_state(tiny_model, token_seq[:, :32], 10)
    logits_a, cache = resume_from_state(tiny_model, state, token_seq[:, 10:15], max_length=96)
    assert cache.views[0].key.shape[1] == 96
    logits_b, cache = forward_chunk(tiny_model, cache, token_seq[:, 15:24])
    expected = no_cache_logits(tiny_model, token_seq[:, :24])
    np.testing.assert_allclose(np.asarray(logits_a), expected[:, 10:15], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(logits_b), expected[:, 15:24], atol=ATOL, rtol=0)


def test_single_row_snapshot_broadcasts_to_branches(tiny_model, token_seq):
    state = capture_state(tiny_model, token_seq[:1, :32], 20)
    continuation = np.stack([token_seq[0, 20:24], token_seq[1, 0:4], token_seq[1, 4:8]])
    logits, _ = resume_from_state(tiny_model, state, continuation)
    for row in range(3):
        ids = np.concatenate([token_seq[:1, :20], continuation[row : row + 1]], axis=1)
        np.testing.assert_allclose(np.asarray(logits[row]), no_cache_logits(tiny_model, ids)[0, 20:], atol=ATOL, rtol=0)


def test_extract_from_live_cache_equals_capture(tiny_model, token_seq):
    """One forward over the batch, then per-row snapshots at several t: no second pass needed."""
    cache = tiny_model.init_cache(batch_size=2, max_length=40)
    _, cache = forward_chunk(tiny_model, cache, token_seq)
    for t, rows in [(5, [1]), (32, [0, 1]), (40, [0])]:
        live = extract_state(tiny_model, cache, token_seq, t, rows=rows)
        captured = capture_state(tiny_model, token_seq[rows], t)
        np.testing.assert_allclose(live.keys, captured.keys, atol=ATOL, rtol=0)
        np.testing.assert_allclose(live.values, captured.values, atol=ATOL, rtol=0)
        np.testing.assert_array_equal(live.token_ids, captured.token_ids)
        assert live.fingerprint == captured.fingerprint


def test_ragged_states_share_one_cache(tiny_model, token_seq):
    """Snapshots of different lengths, K copies each, decode one token in the same call."""
    short = capture_state(tiny_model, token_seq[:1], 7)
    long = capture_state(tiny_model, token_seq[1:], 30)
    cache = cache_from_states(tiny_model, [short, long], max_length=48, repeats=2)
    np.testing.assert_array_equal(np.asarray(cache.views[0].indexs), [7, 7, 30, 30])
    nxt = np.array([[token_seq[0, 7]], [token_seq[0, 7]], [token_seq[1, 30]], [token_seq[1, 30]]])
    logits, _ = forward_chunk(tiny_model, cache, nxt)
    ref0 = no_cache_logits(tiny_model, token_seq[:1, :8])[0, 7]
    ref1 = no_cache_logits(tiny_model, token_seq[1:, :31])[0, 30]
    for row, ref in enumerate([ref0, ref0, ref1, ref1]):
        np.testing.assert_allclose(np.asarray(logits[row, 0]), ref, atol=ATOL, rtol=0)
