"""The dense engine: branches of many states decoded through a fixed set of dense-cache rows.

A call's states sit once each in a pool (a dense cache, one row per snapshot less its last
token); `vinekv.replay.decode_pool` runs the whole loop on the device: rows take the next waiting
branch as theirs end (continuous batching), copy its state's row from the pool, re-run the
state's last token (one token, not a prefill) and sample until an EOS / stop id or the budget.
Rows, pool sizes and cache lengths are bucketed (powers of two; multiples of 16 positions), so
a replay of many states compiles a handful of programs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vinekv.kvstore.dense_cache import cache_from_states, kv_bytes_per_token
from vinekv.kvstore.state import CachedState
from vinekv.replay.decode import decode_pool
from vinekv.replay.engines.base import BranchEngine, Branches, BranchSampling, cut_at_stop_strings

LENGTH_BUCKET = 16
DEFAULT_MAX_ROWS = 64
DEFAULT_MAX_CACHE_MB = 64.0
POOL_BUCKET = 16  # a call's pool of states is a power of two of at least this many rows


def _cache_length(positions: np.ndarray, budgets: np.ndarray) -> int:
    """Positions of a dense cache for states at ``positions`` with branches of up to ``budgets``
    tokens (per state): room for the longest ``position + budget``, a multiple of `LENGTH_BUCKET`
    (decode costs grow with the cache length: a fine bucket, at a few more compiled shapes)."""
    return -(-int(np.max(np.asarray(positions) + np.asarray(budgets))) // LENGTH_BUCKET) * LENGTH_BUCKET


def _bucket_rows(rows: int) -> int:
    return 1 << max(0, (rows - 1).bit_length())


class VanillaEngine(BranchEngine):
    """Dense-cache branch decoding for any EasyDeL causal LM (CPU, GPU, TPU).

    Args:
      model: the policy.
      max_rows: cache rows decoding branches at once (rounded up to a power of two).
      max_cache_mb: the decode rows plus the pool of states fit in this many MiB of dense cache
        (at the call's longest position plus budget; the rows at most half of it): more states
        than the pool holds are decoded in several calls of equal size.
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
        k = sampling.k
        length = _cache_length(np.array([s.position for s in states]), budgets)
        fit = max(2, int(self.max_cache_mb * 2**20 // (length * kv_bytes_per_token(self.model))))
        rows = min(_bucket_rows(self.max_rows), _bucket_rows(len(states) * k))
        while rows > 1 and 2 * rows > fit:  # the decode rows take at most half the budget ...
            rows //= 2
        most = 1 << ((fit - rows).bit_length() - 1)  # ... the states' pool (a power of two) the rest
        per_call = -(-len(states) // -(-len(states) // most))  # calls of equal size: one pool shape
        pool_rows = max(min(POOL_BUCKET, most), _bucket_rows(per_call))
        out: list[Branches] = []
        for start in range(0, len(states), per_call):
            stop = min(start + per_call, len(states))
            call_keys = keys[start * k : stop * k]
            out.extend(
                self._run_pool(
                    list(states[start:stop]),
                    call_keys,
                    budgets[start:stop],
                    rows,
                    pool_rows,
                    length,
                    sampling,
                    tokenizer,
                )
            )
        return out

    def _run_pool(
        self,
        group: list[CachedState],
        keys: np.ndarray,
        budgets: np.ndarray,
        rows: int,
        pool_rows: int,
        length: int,
        sampling: BranchSampling,
        tokenizer: Any,
    ) -> list[Branches]:
        k = sampling.k
        filler = [group[-1]] * (pool_rows - len(group))
        pool = cache_from_states(self.model, [s.prefix(s.position - 1) for s in [*group, *filler]], max_length=length)
        decoded = decode_pool(
            self.model,
            pool,
            np.array([s.token_ids[0, -1] for s in [*group, *filler]], np.int32),
            np.repeat(np.arange(len(group)), k),
            np.repeat(budgets, k),
            keys,
            rows,
            sampling.sampling,
            eos_ids=sampling.eos_ids,
            stop_ids=sampling.stop_ids,
            split=self._model_split(),
        )
        lengths, reasons = decoded.lengths.copy(), list(decoded.ended_by)
        for r in range(len(group) * k):
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
