"""The branch sampler harness: K continuations from each KV snapshot, no re-prefill.

``generate_branches(model, cached_states, sampling_params)`` takes EasyDeL's own
`SamplingParams` (``n`` = K, ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``,
``stop_token_ids``, ``ignore_eos``) and returns, per state, K branches with their tokens,
lengths, finish reasons and the log-probs of the sampled tokens.

The branches are drawn by a `vinekv.replay.engines.BranchEngine` (``vanilla``: dense cache, one
on-device decode loop; ``esurge``: EasyDeL's paged engine with the snapshots injected as
prefix-cache pages), given by name or as a started engine to reuse across calls.

Determinism (vanilla): branch ``k`` of state ``(trajectory, i)`` draws the token at absolute
position ``p`` with ``fold_in(fold_in(fold_in(fold_in(PRNGKey(seed), trajectory), i), k), p)``,
whatever the batching. eSurge: see `vinekv.replay.engines.esurge`.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from vinekv.kvstore.state import CachedState
from vinekv.replay.decode import SAMPLERS
from vinekv.replay.engines import DEFAULT_MAX_ROWS, ENGINES, BranchEngine, Branches, BranchSampling, open_engine

__all__ = ["ENGINES", "Branches", "branch_keys", "eos_token_ids", "generate_branches"]

# SamplingParams fields no engine here implements, with their neutral values.
_UNSUPPORTED = {
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_p": 0.0,
    "min_tokens": 0,
    "logit_bias": None,
    "allowed_token_ids": None,
    "guided_decoding": None,
    "stop_pattern": None,
}


def eos_token_ids(model: Any, tokenizer: Any = None) -> frozenset[int]:
    """The EOS ids a rollout of ``model`` ends at, as EasyDeL's GRPO trainer cuts completions
    (``_eos_token_id``): the tokenizer's EOS and the model's generation-config EOS (an id or a
    list); ``model.config``'s EOS only when neither is set."""

    def ids(value: Any) -> set[int]:
        return set() if value is None else {int(i) for i in np.atleast_1d(value)}

    found = ids(getattr(tokenizer, "eos_token_id", None))
    found |= ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    return frozenset(found or ids(model.config.get_text_config().eos_token_id))


def _plan(model: Any, params: Any, tokenizer: Any, sampler: str) -> BranchSampling:
    for name, neutral in _UNSUPPORTED.items():
        value = getattr(params, name, neutral)
        if value not in (neutral, [], {}):
            raise ValueError(f"SamplingParams.{name}={value!r} is not supported for branch replay")
    if getattr(params, "bad_words", None):
        raise ValueError("SamplingParams.bad_words is not supported for branch replay")
    k = int(params.n)
    if k < 1:
        raise ValueError(f"SamplingParams.n (branches per state) must be >= 1, got {k}")
    if params.max_tokens is None or params.max_tokens < 1:
        raise ValueError(f"SamplingParams.max_tokens must be >= 1 for branch replay, got {params.max_tokens}")
    temperature = 1.0 if params.temperature is None else float(params.temperature)
    if temperature < 0:
        raise ValueError(f"SamplingParams.temperature must be >= 0, got {temperature}")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise ValueError(f"SamplingParams.top_k must be >= 0, got {params.top_k}")
    stop = tuple(params.stop or ())
    if isinstance(params.stop, str):
        stop = (params.stop,)
    if stop and tokenizer is None:
        raise ValueError(f"stop strings {stop} need a tokenizer: pass tokenizer=... to generate_branches")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    return BranchSampling(
        k=k,
        temperature=temperature,
        top_k=int(params.top_k),
        top_p=float(params.top_p),
        stop_ids=frozenset(params.stop_token_ids or ()),
        eos_ids=frozenset() if params.ignore_eos else eos_token_ids(model, tokenizer),
        stop_strings=stop,
        sampler=sampler,
    )


@jax.jit
def _fold_keys(base: jax.Array, trajectory: jax.Array, index: jax.Array, branch: jax.Array) -> jax.Array:
    def fold(t, i, b):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, t), i), b)

    return jax.vmap(fold)(trajectory, index, branch)


def branch_keys(
    seed: int, state_keys: Sequence[tuple[str | int, int]], k: int, first_branch: int | Sequence[int] = 0
) -> np.ndarray:
    """``[len(state_keys) * k]`` PRNG keys: state by state, branches ``first..first+k-1`` within
    each (``first_branch``: one int, or one per state). Branch i of a state has one key, so
    sampling branches 8..15 later gives what a run of 16 would have drawn for them."""
    traj = [t if isinstance(t, int) else zlib.crc32(str(t).encode()) for t, _ in state_keys]
    traj = np.repeat(np.asarray(traj, dtype=np.int64) & 0x7FFFFFFF, k).astype(np.int32)
    index = np.repeat(np.asarray([i for _, i in state_keys], dtype=np.int32), k)
    first = np.broadcast_to(np.asarray(first_branch, dtype=np.int32), (len(state_keys),))
    branch = (np.repeat(first, k) + np.tile(np.arange(k, dtype=np.int32), len(state_keys))).astype(np.int32)
    n = traj.size
    padded = 1 << max(6, (n - 1).bit_length())  # a power of two (>= 64): one compiled program per size class
    traj, index, branch = (np.pad(a, (0, padded - n)) for a in (traj, index, branch))
    return np.asarray(_fold_keys(jax.random.PRNGKey(seed), traj, index, branch))[:n]


def _default_state_keys(states: list[CachedState]) -> list[tuple[int, int]]:
    return [(zlib.crc32(s.token_ids.tobytes()), s.position) for s in states]


def generate_branches(
    model: Any,
    cached_states: Sequence[CachedState],
    sampling_params: Any,
    engine: str | BranchEngine = "auto",
    seed: int = 0,
    *,
    tokenizer: Any = None,
    state_keys: Sequence[tuple[str | int, int]] | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_tokens: Sequence[int] | None = None,
    first_branch: int | Sequence[int] = 0,
    sampler: str = "generate",
) -> list[Branches]:
    """K = ``sampling_params.n`` continuations of every snapshot.

    Args:
      model: EasyDeL causal LM whose layout matches the snapshots.
      cached_states: snapshots (each row of a multi-row state is its own state), positions >= 2.
      sampling_params: EasyDeL `SamplingParams`.
      engine: ``"auto"`` | ``"vanilla"`` | ``"esurge"`` (opened for this call and closed after,
        `vinekv.replay.engines.open_engine`), or a started `BranchEngine` to reuse.
      seed: run seed of the branch keys.
      tokenizer: needed for stop strings; its EOS also ends a branch (as it ends a rollout).
      state_keys: one ``(trajectory_id, state_index)`` per state for the branch keys; default
        ``(crc32 of the prefix tokens, position)``.
      max_rows: rows (states x K) decoded together (an engine opened here).
      max_tokens: token budget per state (default ``sampling_params.max_tokens`` for all).
      first_branch: index of each state's first branch (one int or one per state): the K
        branches are ``first..first+K-1``, keyed by index (`branch_keys`).
      sampler: whose truncation order to reproduce, ``"generate"`` or ``"esurge"`` (`sample_tokens`).

    Returns:
      one `Branches` per state, in order.
    """
    if isinstance(engine, str) and engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    sampling = _plan(model, sampling_params, tokenizer, sampler)
    states = [s.select(r) for s in cached_states for r in range(s.batch)]
    if not states:
        return []
    for s in states:
        if s.position < 2:
            raise ValueError(f"a snapshot must cover >= 2 positions to branch from it, got {s.position}")
    keys = _default_state_keys(states) if state_keys is None else list(state_keys)
    if len(keys) != len(states):
        raise ValueError(f"{len(keys)} state_keys for {len(states)} states")
    budgets = np.full(len(states), int(sampling_params.max_tokens)) if max_tokens is None else np.asarray(max_tokens)
    if budgets.shape != (len(states),) or np.any(budgets < 1):
        raise ValueError(f"max_tokens must give one budget >= 1 per state ({len(states)}), got {budgets.tolist()}")
    all_keys = branch_keys(seed, keys, sampling.k, first_branch)
    if isinstance(engine, BranchEngine):
        return engine.expand(states, sampling, all_keys, budgets, tokenizer)
    with open_engine(engine, model, tokenizer=tokenizer, max_rows=max_rows) as opened:
        return opened.expand(states, sampling, all_keys, budgets, tokenizer)
