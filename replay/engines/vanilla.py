"""The dense engine: snapshots written into a dense cache, all rows decoded in one on-device loop.

Each snapshot is written once per branch row (K copies); states are batched (rows = states x K)
into buckets of power-of-two rows and cache lengths rounded up to 64 tokens, so a replay of many
states compiles a handful of programs. The snapshot at ``t`` covers ``[0, t)``; its last token is
re-run (one token, not a prefill) to get the next-token distribution, then `replay.decode_rows`
runs the whole sample-then-forward loop on the device (EOS, stop ids and budgets checked there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvstore.dense_cache import cache_from_states, forward_chunk, kv_bytes_per_token
from kvstore.state import CachedState
from replay.decode import decode_rows, step_width
from replay.engines.base import BranchEngine, Branches, BranchSampling, cut_at_stop_strings

LENGTH_BUCKET = 64
DEFAULT_MAX_ROWS = 64
DEFAULT_MAX_CACHE_MB = 64.0


def _cache_length(longest: int, budget: int) -> int:
    """Positions of a dense cache for snapshots up to ``longest`` positions and branches of up to
    ``budget`` tokens: room for the bucketed token buffer too (`step_width`), so the buffer's
    width, a compiled shape, does not follow ``longest``; a multiple of `LENGTH_BUCKET`."""
    return -(-(longest + step_width(budget)) // LENGTH_BUCKET) * LENGTH_BUCKET


def _bucket_rows(rows: int) -> int:
    return 1 << max(0, (rows - 1).bit_length())


class VanillaEngine(BranchEngine):
    """Dense-cache branch decoding for any EasyDeL causal LM (CPU, GPU, TPU).

    Args:
      model: the policy.
      max_rows: rows (states x K) decoded together, before rounding up to a power of two.
      max_cache_mb: ... and no more rows than a dense cache of this many MiB holds at the call's
        longest prefix plus budget (at least one state's K rows): a call with many long states
        is decoded in several batches rather than one cache of all of them.
    """

    name = "vanilla"

    def __init__(self, model: Any, max_rows: int = DEFAULT_MAX_ROWS, max_cache_mb: float = DEFAULT_MAX_CACHE_MB):
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        if not max_cache_mb > 0:
            raise ValueError(f"max_cache_mb must be > 0, got {max_cache_mb}")
        self.model, self.max_rows, self.max_cache_mb = model, max_rows, max_cache_mb
        self._split: tuple[Any, Any, Any] | None = None  # model.split_module(), taken once per model

    def close(self) -> None:
        """Nothing to release: compiled programs are shared by every engine of the process."""

    def update_model(self, model: Any) -> None:
        self.model, self._split = model, None

    def _model_split(self) -> tuple[Any, Any, Any]:
        """The model's ``split_module()`` (graph, params, rest): flattening the module graph costs
        ~10-30 ms, once per model rather than per decode batch."""
        if self._split is None:
            self._split = self.model.split_module()
        return self._split

    def expand(
        self,
        states: Sequence[CachedState],
        sampling: BranchSampling,
        keys: np.ndarray,
        budgets: np.ndarray,
        tokenizer: Any = None,
    ) -> list[Branches]:
        longest = max(s.position for s in states)
        row_bytes = _cache_length(longest, int(np.max(budgets))) * kv_bytes_per_token(self.model)
        rows = min(self.max_rows, int(self.max_cache_mb * 2**20 // row_bytes))
        per_group = max(1, rows // sampling.k)
        out: list[Branches] = []
        for start in range(0, len(states), per_group):
            stop = min(start + per_group, len(states))
            group_keys = keys[start * sampling.k : stop * sampling.k]
            out.extend(self._run_group(list(states[start:stop]), group_keys, budgets[start:stop], sampling, tokenizer))
        return out

    def _run_group(
        self, group: list[CachedState], keys: np.ndarray, budgets: np.ndarray, sampling: BranchSampling, tokenizer: Any
    ) -> list[Branches]:
        model, k = self.model, sampling.k
        rows = len(group) * k
        padded = _bucket_rows(rows)
        filler = [group[-1]] * ((padded - rows + k - 1) // k)
        prefixes = [s.prefix(s.position - 1) for s in [*group, *filler]]
        max_length = _cache_length(max(s.position for s in group), int(budgets.max()))
        cache = cache_from_states(model, prefixes, max_length=max_length, repeats=k)
        total = cache.views[0].key.shape[0]
        last = np.repeat([s.token_ids[0, -1] for s in [*group, *filler]], k)[:, None].astype(np.int32)
        split = self._model_split()
        logits, cache = forward_chunk(model, cache, last, split=split)
        decoded = decode_rows(
            model,
            cache,
            logits[:, -1],
            np.concatenate([np.repeat(budgets, k), np.ones(total - rows, np.int64)]),
            np.concatenate([keys, np.repeat(keys[-1:], total - rows, axis=0)]),
            sampling.sampling,
            eos_ids=sampling.eos_ids,
            stop_ids=sampling.stop_ids,
            split=split,
        )
        lengths, reasons = decoded.lengths.copy(), list(decoded.ended_by)
        for r in range(rows):
            lengths[r], reasons[r] = cut_at_stop_strings(
                decoded.tokens[r], int(lengths[r]), reasons[r], sampling, tokenizer
            )
        return [
            Branches(
                tokens=[decoded.tokens[r, : lengths[r]].copy() for r in range(s * k, (s + 1) * k)],
                lengths=lengths[s * k : (s + 1) * k].copy(),
                finish_reasons=reasons[s * k : (s + 1) * k],
                logprobs=[decoded.logprobs[r, : lengths[r]].copy() for r in range(s * k, (s + 1) * k)],
            )
            for s in range(len(group))
        ]
