"""The branch sampler harness: K continuations from each KV snapshot, no re-prefill.

``generate_branches(model, cached_states, sampling_params)`` takes EasyDeL's own
`SamplingParams` (``n`` = K, ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop``,
``stop_token_ids``, ``ignore_eos``) and returns, per state, K branches with their tokens,
lengths, finish reasons and the log-probs of the sampled tokens.

Engine ``vanilla``: each snapshot is written once into a dense cache and broadcast to its K rows;
states are batched (rows = states x K) into buckets of power-of-two rows and cache lengths
rounded up to 64 tokens, so a replay of many states compiles a handful of programs. The
snapshot at ``t`` covers ``[0, t)``; its last token is re-run (one token, not a prefill) to get
the next-token distribution.

Determinism: branch ``k`` of state ``(trajectory, i)`` draws the token at absolute position ``p``
with ``fold_in(fold_in(fold_in(fold_in(PRNGKey(seed), trajectory), i), k), p)``, whatever the
batching.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from kvstore.dense_cache import cache_from_states, forward_chunk
from kvstore.state import CachedState
from replay.decode import SAMPLERS, decode_step_fn

logger = logging.getLogger(__name__)

ENGINES = ("auto", "vanilla", "esurge")
LENGTH_BUCKET = 64
DEFAULT_MAX_ROWS = 64
# SamplingParams fields the vanilla engine does not implement, with their neutral values.
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


@dataclasses.dataclass
class Branches:
    """K continuations of one state.

    Attributes:
      tokens: K int32 arrays; a finished branch ends with its EOS/stop token.
      lengths: ``[K]`` tokens per branch.
      finish_reasons: ``"eos"``, ``"stop"`` (stop token id or stop string) or ``"length"``.
      logprobs: K float32 arrays, the log-prob of each sampled token (see `sample_tokens`).
    """

    tokens: list[np.ndarray]
    lengths: np.ndarray
    finish_reasons: list[str]
    logprobs: list[np.ndarray]

    @property
    def finished(self) -> np.ndarray:
        """``[K]`` bool: the branch ended by EOS or a stop condition, not the token budget."""
        return np.array([r != "length" for r in self.finish_reasons])


@dataclasses.dataclass(frozen=True)
class _Plan:
    k: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_ids: frozenset[int]
    eos_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    sampler: str

    @property
    def sampling(self) -> tuple[float, int, float, str]:
        """The decode step's static sampling arguments."""
        return self.temperature, self.top_k, self.top_p, self.sampler


def eos_token_ids(model: Any, tokenizer: Any = None) -> frozenset[int]:
    """The EOS ids a rollout of ``model`` ends at, as EasyDeL's GRPO trainer cuts completions
    (``_eos_token_id``): the tokenizer's EOS and the model's generation-config EOS (an id or a
    list); ``model.config``'s EOS only when neither is set."""

    def ids(value: Any) -> set[int]:
        return set() if value is None else {int(i) for i in np.atleast_1d(value)}

    found = ids(getattr(tokenizer, "eos_token_id", None))
    found |= ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    return frozenset(found or ids(model.config.get_text_config().eos_token_id))


def resolve_engine(engine: str) -> str:
    """The engine that will run: ``vanilla`` for now (the eSurge path is its own issue)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "esurge":
        raise ValueError(
            "engine 'esurge' is not available yet: injecting stored KV into eSurge's paged cache is "
            "the subject of the eSurge issue; use engine='vanilla' (or 'auto')"
        )
    if engine == "auto":
        _log_auto_once()
    return "vanilla"


@functools.cache
def _log_auto_once() -> None:
    logger.info("engine 'auto' -> 'vanilla': eSurge snapshot injection is not available yet")


def _plan(model: Any, params: Any, tokenizer: Any, sampler: str) -> _Plan:
    for name, neutral in _UNSUPPORTED.items():
        value = getattr(params, name, neutral)
        if value not in (neutral, [], {}):
            raise ValueError(f"SamplingParams.{name}={value!r} is not supported by the vanilla engine")
    if getattr(params, "bad_words", None):
        raise ValueError("SamplingParams.bad_words is not supported by the vanilla engine")
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
    return _Plan(
        k=k,
        max_tokens=int(params.max_tokens),
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
    return np.asarray(_fold_keys(jax.random.PRNGKey(seed), traj, index, branch))


def _default_state_keys(states: list[CachedState]) -> list[tuple[int, int]]:
    return [(zlib.crc32(s.token_ids.tobytes()), s.position) for s in states]


def _bucket_rows(rows: int) -> int:
    return 1 << max(0, (rows - 1).bit_length())


def generate_branches(
    model: Any,
    cached_states: Sequence[CachedState],
    sampling_params: Any,
    engine: str = "auto",
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
      engine: ``"auto"`` | ``"vanilla"`` | ``"esurge"``.
      seed: run seed of the branch keys.
      tokenizer: needed for stop strings; its EOS also ends a branch (as it ends a rollout).
      state_keys: one ``(trajectory_id, state_index)`` per state for the branch keys; default
        ``(crc32 of the prefix tokens, position)``.
      max_rows: rows (states x K) decoded together, before rounding up to a power of two.
      max_tokens: token budget per state (default ``sampling_params.max_tokens`` for all).
      first_branch: index of each state's first branch (one int or one per state): the K
        branches are ``first..first+K-1``, keyed by index (`branch_keys`).
      sampler: whose truncation order to reproduce, ``"generate"`` or ``"esurge"`` (`sample_tokens`).

    Returns:
      one `Branches` per state, in order.
    """
    resolve_engine(engine)
    plan = _plan(model, sampling_params, tokenizer, sampler)
    states = [s.select(r) for s in cached_states for r in range(s.batch)]
    if not states:
        return []
    for s in states:
        if s.position < 2:
            raise ValueError(f"a snapshot must cover >= 2 positions to branch from it, got {s.position}")
    keys = _default_state_keys(states) if state_keys is None else list(state_keys)
    if len(keys) != len(states):
        raise ValueError(f"{len(keys)} state_keys for {len(states)} states")
    budgets = np.full(len(states), plan.max_tokens, np.int64) if max_tokens is None else np.asarray(max_tokens)
    if budgets.shape != (len(states),) or np.any(budgets < 1):
        raise ValueError(f"max_tokens must give one budget >= 1 per state ({len(states)}), got {budgets.tolist()}")
    all_keys = branch_keys(seed, keys, plan.k, first_branch)
    per_group = max(1, max_rows // plan.k)
    out: list[Branches] = []
    for start in range(0, len(states), per_group):
        stop = start + per_group
        group_keys = all_keys[start * plan.k : min(stop, len(states)) * plan.k]
        out.extend(_run_group(model, states[start:stop], group_keys, budgets[start:stop], plan, tokenizer))
    return out


def _run_group(
    model: Any, group: list[CachedState], keys: np.ndarray, budgets: np.ndarray, plan: _Plan, tokenizer: Any
) -> list[Branches]:
    rows = len(group) * plan.k
    padded = _bucket_rows(rows)
    pad_states = (padded - rows + plan.k - 1) // plan.k
    filler = [group[-1]] * pad_states
    prefixes = [s.prefix(s.position - 1) for s in [*group, *filler]]
    steps = int(budgets.max())
    longest = max(s.position for s in group)
    max_length = -(-(longest + steps) // LENGTH_BUCKET) * LENGTH_BUCKET
    cache = cache_from_states(model, prefixes, max_length=max_length, repeats=plan.k)
    total = cache.views[0].key.shape[0]
    last = np.repeat([s.token_ids[0, -1] for s in [*group, *filler]], plan.k)[:, None].astype(np.int32)
    split = model.split_module()
    logits, cache = forward_chunk(model, cache, last, split=split)
    row_keys = np.concatenate([keys, np.repeat(keys[-1:], total - rows, axis=0)])
    step = decode_step_fn()
    graphdef, graphstate, graphother = split
    tokens = np.zeros((total, steps), np.int32)
    logprobs = np.zeros((total, steps), np.float32)
    row_budget = np.repeat(budgets, plan.k)
    reasons: list[str | None] = [None] * rows
    lengths = row_budget.copy()
    logits = logits[:, -1]
    with model.mesh:
        for i in range(steps):
            tok, lp, logits, cache = step(graphdef, graphstate, graphother, cache, logits, row_keys, *plan.sampling)
            tokens[:, i], logprobs[:, i] = jax.device_get((tok, lp))
            for r in range(rows):
                if (
                    reasons[r] is None
                    and i < row_budget[r]
                    and (reason := _finish(tokens[r, : i + 1], plan, tokenizer))
                ):
                    reasons[r], lengths[r] = reason, i + 1
            if all(reasons[r] is not None or i + 1 >= row_budget[r] for r in range(rows)):
                break
    result = []
    for s in range(len(group)):
        idx = range(s * plan.k, (s + 1) * plan.k)
        result.append(
            Branches(
                tokens=[tokens[r, : lengths[r]].copy() for r in idx],
                lengths=lengths[list(idx)].copy(),
                finish_reasons=[reasons[r] or "length" for r in idx],
                logprobs=[logprobs[r, : lengths[r]].copy() for r in idx],
            )
        )
    return result


def _finish(generated: np.ndarray, plan: _Plan, tokenizer: Any) -> str | None:
    """Why a branch ends after its last token, or None."""
    last = int(generated[-1])
    if last in plan.eos_ids:
        return "eos"
    if last in plan.stop_ids:
        return "stop"
    if plan.stop_strings:
        longest = max(len(s) for s in plan.stop_strings)
        tail = tokenizer.decode(generated[-(longest + 8) :].tolist(), skip_special_tokens=True)
        before = tokenizer.decode(generated[-(longest + 8) : -1].tolist(), skip_special_tokens=True)
        if any(s in tail and s not in before for s in plan.stop_strings):
            return "stop"
    return None
