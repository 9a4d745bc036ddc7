"""Bad input to capture/resume raises a clear error naming the problem."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from vinekv.kvstore import (
    CachedState,
    StalePolicyError,
    cache_from_states,
    capture_state,
    extract_state,
    forward_chunk,
    resume_from_state,
)


@pytest.fixture(scope="module")
def state(tiny_model, token_seq):
    return capture_state(tiny_model, token_seq[:, :32], 12)


def _with_layout(state, keys, **layout_changes):
    return dataclasses.replace(
        state, keys=keys, values=keys.copy(), layout=dataclasses.replace(state.layout, **layout_changes)
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: _with_layout(s, s.keys[:1], num_layers=1), "num_layers: snapshot has 1, model has 2"),
        (lambda s: _with_layout(s, s.keys[:, :, :, :1], num_kv_heads=1), "num_kv_heads: snapshot has 1, model has 2"),
        (lambda s: _with_layout(s, s.keys[..., :8], head_dim=8), "head_dim: snapshot has 8, model has 16"),
        (lambda s: _with_layout(s, s.keys, vocab_size=512), "vocab_size: snapshot has 512, model has 260"),
        (lambda s: _with_layout(s, s.keys, model_type="qwen2"), "model_type: snapshot has 'qwen2'"),
    ],
)
def test_snapshot_from_another_model_shape(tiny_model, token_seq, state, mutate, message):
    with pytest.raises(ValueError, match=message):
        resume_from_state(tiny_model, mutate(state), token_seq[:, 12:13])
    with pytest.raises(ValueError, match=message):
        cache_from_states(tiny_model, [mutate(state)], max_length=32)


def test_position_out_of_range(tiny_model, token_seq):
    with pytest.raises(ValueError, match=r"position 33 outside \[1, 32\] \(the prompt has 32 tokens\)"):
        capture_state(tiny_model, token_seq[:, :32], 33)
    with pytest.raises(ValueError, match=r"position 0 outside"):
        capture_state(tiny_model, token_seq[:, :32], 0)
    with pytest.raises(TypeError, match="position must be an int"):
        capture_state(tiny_model, token_seq[:, :32], 3.0)


def test_bad_token_arrays(tiny_model, token_seq, state):
    with pytest.raises(ValueError, match=r"continuation_ids is empty \(shape \(2, 0\)\)"):
        resume_from_state(tiny_model, state, np.zeros((2, 0), np.int32))
    with pytest.raises(ValueError, match=r"continuation_ids must be \[batch, length\]"):
        resume_from_state(tiny_model, state, np.array([1, 2], np.int32))
    with pytest.raises(TypeError, match="integer token ids, got dtype float32"):
        resume_from_state(tiny_model, state, np.ones((2, 1), np.float32))
    with pytest.raises(ValueError, match=r"ids outside the vocabulary \[0, 260\)"):
        resume_from_state(tiny_model, state, np.full((2, 1), 300, np.int32))
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        capture_state(tiny_model, np.zeros((1, 0), np.int32), 1)
    with pytest.raises(ValueError, match="snapshot has 2 rows but continuation_ids has 3"):
        resume_from_state(tiny_model, state, np.ones((3, 1), np.int32))
    with pytest.raises(TypeError, match="cached_state must be a CachedState"):
        resume_from_state(tiny_model, {"keys": state.keys}, token_seq[:, :1])


def test_cache_capacity(tiny_model, token_seq, state):
    with pytest.raises(ValueError, match=r"max_length 12 < snapshot position 12 \+ 1 new tokens"):
        resume_from_state(tiny_model, state, token_seq[:, 12:13], max_length=12)
    with pytest.raises(ValueError, match="max_length 8 is shorter than the longest snapshot"):
        cache_from_states(tiny_model, [state], max_length=8)


def test_stale_fingerprint_refused_only_when_checked(tiny_model, token_seq, state):
    stale = dataclasses.replace(state, fingerprint="0" * 32)
    with pytest.raises(StalePolicyError, match="the snapshot was made by policy"):
        resume_from_state(tiny_model, stale, token_seq[:, 12:13], check_policy=True)
    resume_from_state(tiny_model, stale, token_seq[:, 12:13])  # the caller did not ask for a check
    resume_from_state(tiny_model, state, token_seq[:, 12:13], check_policy=True)


def test_extract_beyond_filled_positions(tiny_model, token_seq):
    cache = tiny_model.init_cache(batch_size=2, max_length=32)
    _, cache = forward_chunk(tiny_model, cache, token_seq[:, :10])
    with pytest.raises(ValueError, match=r"position 11 outside \[1, 10\] filled"):
        extract_state(tiny_model, cache, token_seq, 11)
    with pytest.raises(ValueError, match=r"rows \[2\] outside the cache's batch of 2"):
        extract_state(tiny_model, cache, token_seq, 5, rows=[2])


def test_inconsistent_cached_state(state):
    with pytest.raises(ValueError, match="token_ids shape"):
        dataclasses.replace(state, token_ids=state.token_ids[:, :3])
    with pytest.raises(ValueError, match="disagrees with layout"):
        dataclasses.replace(state, keys=state.keys[:1], values=state.values[:1])
    assert isinstance(state, CachedState)
