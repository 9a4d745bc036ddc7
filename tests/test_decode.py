"""Decoding continued from a resumed snapshot reproduces uninterrupted decoding token for token."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import get_model, no_cache_logits

from kvstore import extract_state, resume_from_state
from replay import decode, prefill, row_keys_for

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
