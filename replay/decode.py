"""Token-by-token decoding from a dense cache, reproducible from any prefix.

The token at absolute position ``p`` of row ``b`` is drawn with the key
``fold_in(row_keys[b], p)``: it depends on the row's key and the position only, so decoding
resumed from a snapshot at ``t`` with the same row key draws exactly the tokens an
uninterrupted decode draws after ``t``. ``temperature == 0`` is greedy (argmax).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from easydel.caching import TransformerCache

from vinekv.kvstore.dense_cache import empty_cache, forward_chunk, forward_split


@dataclasses.dataclass
class Decoded:
    """Result of `decode`.

    Attributes:
      tokens: ``[batch, n]`` int32 sampled tokens.
      logprobs: ``[batch, n]`` float32 log-probability of each sampled token under the
        sampling distribution (logits / temperature; raw logits when greedy).
      cache: the cache after the last decode step (every row advanced by the steps run).
      next_logits: ``[batch, vocab]`` next-token logits after the last step.
      lengths: ``[batch]`` tokens of each row: up to and including its EOS / stop token, else
        its budget.
      ended_by: per row, ``"eos"``, ``"stop"`` (a stop id) or ``"length"`` (the budget).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    cache: TransformerCache
    next_logits: jax.Array
    lengths: np.ndarray
    ended_by: list[str]


SAMPLERS = ("generate", "esurge")


def truncated_logits(
    logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0, sampler: str = "generate"
) -> jax.Array:
    """``[batch, vocab]`` float32 logits of the sampling distribution (``-inf`` outside it).

    ``generate`` (EasyDeL's compiled ``generate``, Hugging Face's warper order): divide by the
    temperature, keep the tokens at least as likely as the k-th (ties kept), then keep the
    smallest most-likely prefix of the *renormalised top-k* distribution whose mass reaches
    ``top_p``: a token is kept iff the mass before it, in descending order with ties broken by
    lower index, is ``< top_p``. ``esurge`` (eSurge's sampler): the same top-k, then top-p on
    the untempered distribution keeping every token tied at the boundary (a token is kept iff
    the mass of strictly more likely tokens is ``< top_p``), and only then the temperature.
    """
    logits = logits.astype(jnp.float32)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "generate":
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        probs = jax.nn.softmax(logits, axis=-1)
        if sampler == "generate":
            order = jnp.argsort(-logits, axis=-1, stable=True)
            sorted_p = jnp.take_along_axis(probs, order, axis=-1)
            keep_sorted = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) < top_p
            rows = jnp.arange(logits.shape[0])[:, None]
            keep = jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)
        else:  # mass of strictly more likely tokens, per token
            sorted_p = -jnp.sort(-probs, axis=-1)
            before = jnp.cumsum(sorted_p, axis=-1) - sorted_p
            first = jax.vmap(lambda sp, p: jnp.searchsorted(-sp, -p, side="left"))(sorted_p, probs)
            keep = jnp.take_along_axis(before, first, axis=-1) < top_p
        logits = jnp.where(keep, logits, -jnp.inf)
    if sampler == "esurge":
        logits = logits / temperature
    return logits


def sample_tokens(
    logits: jax.Array,
    row_keys: jax.Array,
    positions: jax.Array,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    sampler: str = "generate",
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row from `truncated_logits`.

    Args:
      logits: ``[batch, vocab]``.
      row_keys: ``[batch]`` PRNG keys, one per row.
      positions: ``[batch]`` absolute position of the token being drawn.
      temperature: 0 for greedy.
      top_k: keep the ``top_k`` most likely tokens (0: all).
      top_p: nucleus mass (1: all).
      sampler: whose order of temperature, top-k and top-p to follow (`truncated_logits`).

    Returns:
      ``(tokens [batch] int32, logprobs [batch] float32)``; the log-probability is under the
      temperature-scaled distribution before top-k/top-p truncation (the policy's own).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        tokens = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        logp = jax.nn.log_softmax(logits / temperature, axis=-1)
        allowed = truncated_logits(logits, temperature, top_k, top_p, sampler)
        keys = jax.vmap(jax.random.fold_in)(row_keys, positions)
        tokens = jax.vmap(jax.random.categorical)(keys, allowed)
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


ENDED_BY = ("length", "eos", "stop")  # `Decoded.ended_by` codes: budget, an EOS id, a stop id
STEP_BUCKET = 16  # the token buffer's width is rounded up to this (fewer compiled shapes)


def step_width(steps: int) -> int:
    """The token buffer's width for ``steps`` decode steps: ``steps`` rounded up to `STEP_BUCKET`."""
    return -(-steps // STEP_BUCKET) * STEP_BUCKET


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling settings of a decode: temperature (0: greedy), top-k (0: off), top-p
    (1: off) and whose truncation order to follow (`truncated_logits`)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    sampler: str = "generate"


def _decode_loop(
    graphdef, graphstate, graphother, cache, logits, row_keys, budgets, eos_ids, stop_ids, width, sampling
):
    """``lax.while_loop`` over sample-then-forward steps, all on the device: a row ends at its
    first EOS / stop id or at its budget; the loop ends when every row has (or at ``width``)."""
    rows = logits.shape[0]

    def cond(carry):
        i, done = carry[0], carry[5]
        return (i < width) & ~jnp.all(done)

    def body(carry):
        i, cache, logits, tokens, logprobs, done, lengths, ended_by = carry
        positions = cache.views[0].indexs
        tok, lp = sample_tokens(
            logits, row_keys, positions, sampling.temperature, sampling.top_k, sampling.top_p, sampling.sampler
        )
        new_logits, cache = forward_split(graphdef, graphstate, graphother, cache, tok[:, None])
        reason = jnp.where(jnp.isin(tok, eos_ids), 1, jnp.where(jnp.isin(tok, stop_ids), 2, 0)).astype(jnp.int32)
        ends = ~done & (i < budgets) & (reason > 0)
        lengths = jnp.where(ends, i + 1, lengths)
        ended_by = jnp.where(ends, reason, ended_by)
        done = done | ends | (i + 1 >= budgets)
        tokens, logprobs = tokens.at[:, i].set(tok), logprobs.at[:, i].set(lp)
        return i + 1, cache, new_logits[:, -1], tokens, logprobs, done, lengths, ended_by

    carry = (
        jnp.int32(0),
        cache,
        logits,
        jnp.zeros((rows, width), jnp.int32),
        jnp.zeros((rows, width), jnp.float32),
        budgets < 1,
        budgets,
        jnp.zeros((rows,), jnp.int32),
    )
    _, cache, logits, tokens, logprobs, _, lengths, ended_by = jax.lax.while_loop(cond, body, carry)
    return tokens, logprobs, lengths, ended_by, cache, logits


@functools.cache
def decode_loop_fn():
    """The jitted `_decode_loop` (model graph, buffer width and sampling static)."""
    donate = () if jax.default_backend() == "cpu" else (3,)
    return jax.jit(_decode_loop, static_argnums=(0, 9, 10), donate_argnums=donate)


@dataclasses.dataclass
class PoolDecoded:
    """Result of `decode_pool`, one entry per branch.

    Attributes:
      tokens: ``[branches, width]`` int32 sampled tokens (entries past a branch's length unused).
      logprobs: ``[branches, width]`` float32, as in `Decoded`.
      lengths: ``[branches]`` tokens of each branch (up to and including its EOS / stop token).
      ended_by: per branch, ``"eos"``, ``"stop"`` or ``"length"``.
      row_steps: decode steps run times rows (the work done; ``lengths.sum()`` of it was kept).
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    ended_by: list[str]
    row_steps: int


def _pool_loop(
    graphdef,
    graphstate,
    graphother,
    rows_cache,
    pool_keys,
    pool_values,
    pool_positions,
    pool_last,
    branch_state,
    branch_keys,
    budgets,
    num_branches,
    eos_ids,
    stop_ids,
    width,
    sampling,
):
    """Continuous batching of branches over a fixed set of cache rows, all on the device.

    Once at least 1/8 of the rows are idle (or none is busy), that many idle rows take the next
    waiting branches (so rows start staggered): such a row's cache becomes a copy of its
    branch's state (``pool_*``: the snapshot less its last token, that token, and the position
    it sits at) and it feeds that last token. Each step, every row runs one forward, draws a
    token with its branch's key at its position, records it, and ends at an EOS / stop id or at
    its branch's budget.
    """
    rows = rows_cache.views[0].key.shape[0]
    size = budgets.shape[0]
    slots = max(1, rows // 8)  # rows refilled at once: a refill copies this many cache rows

    def refill(args):
        cache, inp, row_branch, row_step, next_branch = args
        idle = jnp.nonzero(row_branch >= size, size=slots, fill_value=rows)[0]
        branch = next_branch + jnp.arange(slots, dtype=jnp.int32)
        take = (idle < rows) & (branch < num_branches)
        at = jnp.where(take, idle, rows)  # rows not taken: dropped
        state = branch_state[jnp.where(take, branch, 0)]
        views = [
            view.replace(
                key=view.key.at[at].set(pool_keys[layer][state], mode="drop"),
                value=view.value.at[at].set(pool_values[layer][state], mode="drop"),
                indexs=view.indexs.at[at].set(pool_positions[state], mode="drop"),
            )
            for layer, view in enumerate(cache.views)
        ]
        return (
            cache.replace(views=views),
            inp.at[at].set(pool_last[state], mode="drop"),
            row_branch.at[at].set(branch, mode="drop"),
            row_step.at[at].set(0, mode="drop"),
            next_branch + jnp.sum(take),
        )

    def cond(carry):
        row_branch, next_branch = carry[3], carry[5]
        return jnp.any(row_branch < size) | (next_branch < num_branches)

    def body(carry):
        steps, cache, inp, row_branch, row_step, next_branch, tokens, logprobs, lengths, ended_by = carry
        idle = jnp.sum(row_branch >= size)
        wanted = ((idle >= slots) | (idle == rows)) & (next_branch < num_branches)
        cache, inp, row_branch, row_step, next_branch = jax.lax.cond(
            wanted, refill, lambda args: args, (cache, inp, row_branch, row_step, next_branch)
        )
        busy = row_branch < size
        logits, cache = forward_split(graphdef, graphstate, graphother, cache, inp[:, None])
        positions = cache.views[0].indexs
        keys = branch_keys[jnp.where(busy, row_branch, 0)]
        tok, lp = sample_tokens(
            logits[:, -1], keys, positions, sampling.temperature, sampling.top_k, sampling.top_p, sampling.sampler
        )
        target = jnp.where(busy, row_branch, size)  # idle rows write nowhere (dropped)
        tokens = tokens.at[target, row_step].set(tok, mode="drop")
        logprobs = logprobs.at[target, row_step].set(lp, mode="drop")
        reason = jnp.where(jnp.isin(tok, eos_ids), 1, jnp.where(jnp.isin(tok, stop_ids), 2, 0)).astype(jnp.int32)
        stopped = busy & (reason > 0)
        lengths = lengths.at[jnp.where(stopped, row_branch, size)].set(row_step + 1, mode="drop")
        ended_by = ended_by.at[jnp.where(stopped, row_branch, size)].set(reason, mode="drop")
        ends = stopped | (busy & (row_step + 1 >= budgets[jnp.where(busy, row_branch, 0)]))
        row_branch = jnp.where(ends, size, row_branch)
        return (
            steps + 1,
            cache,
            tok,
            row_branch,
            row_step + 1,
            next_branch,
            tokens,
            logprobs,
            lengths,
            ended_by,
        )

    carry = (
        jnp.int32(0),
        rows_cache,
        jnp.zeros((rows,), jnp.int32),
        jnp.full((rows,), size, jnp.int32),
        jnp.zeros((rows,), jnp.int32),
        jnp.int32(0),
        jnp.zeros((size, width), jnp.int32),
        jnp.zeros((size, width), jnp.float32),
        budgets,
        jnp.zeros((size,), jnp.int32),
    )
    steps, *_, tokens, logprobs, lengths, ended_by = jax.lax.while_loop(cond, body, carry)
    return tokens, logprobs, lengths, ended_by, steps


@functools.cache
def pool_loop_fn():
    """The jitted `_pool_loop` (model graph, buffer width and sampling static)."""
    return jax.jit(_pool_loop, static_argnums=(0, 14, 15))


def decode_pool(
    model: Any,
    pool: TransformerCache,
    last_tokens: np.ndarray,
    branch_state: np.ndarray,
    budgets: np.ndarray,
    branch_keys: jax.Array,
    rows: int,
    sampling: Sampling = Sampling(),
    *,
    eos_ids: Sequence[int] = (),
    stop_ids: Sequence[int] = (),
    split: tuple[Any, Any, Any] | None = None,
) -> PoolDecoded:
    """Decodes many branches of many states through ``rows`` cache rows, each row taking the next
    branch when its branch ends (continuous batching), in one on-device loop.

    A branch's tokens are exactly those `decode_rows` draws for it in a cache of its own: token
    ``p`` is drawn with ``fold_in(branch_keys[j], p)`` from the state's KV alone, whichever rows
    and neighbours it is decoded with.

    Args:
      model: the policy; ``split`` is its ``split_module()`` if at hand.
      pool: dense cache, one row per state: the snapshot less its last token (``indexs`` = that
        token's position); its length must fit every state's position plus its branches' budget.
      last_tokens: ``[states]`` each snapshot's last token.
      branch_state: ``[branches]`` the pool row each branch continues (in the order rows take them).
      budgets: ``[branches]`` most tokens per branch (>= 1).
      branch_keys: ``[branches]`` PRNG keys.
      rows: cache rows decoded at once.
      sampling: temperature, top-k, top-p and truncation order.
      eos_ids, stop_ids: token ids that end a branch.
    """
    budgets, keys = np.asarray(budgets, np.int32), np.asarray(jax.device_get(branch_keys))
    size = budgets.shape[0]
    if branch_state.shape != (size,) or keys.shape[0] != size or np.any(budgets < 1):
        raise ValueError(f"branch_state, keys and budgets (>= 1) must have one entry per branch ({size})")
    if sampling.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {sampling.temperature}")
    capacity = pool.views[0].key.shape[1]
    starts = np.asarray(jax.device_get(pool.views[0].indexs))[branch_state] + 1
    if np.any(starts + budgets > capacity):
        raise ValueError(f"cache of max_length {capacity} has no room for a state's position plus its budget")
    padded = max(64, 1 << (size - 1).bit_length())  # a power-of-two buffer: branches beyond `size` never start
    pad = padded - size
    graphdef, graphstate, graphother = split or model.split_module()
    ids = [np.asarray(sorted(set(map(int, x))), np.int32) for x in (eos_ids, stop_ids)]
    rows_cache = empty_cache(model, rows, capacity)
    with model.mesh:
        tokens, logprobs, lengths, ended_by, steps = pool_loop_fn()(
            graphdef,
            graphstate,
            graphother,
            rows_cache,
            [v.key for v in pool.views],
            [v.value for v in pool.views],
            pool.views[0].indexs,
            jnp.asarray(last_tokens, jnp.int32),
            jnp.asarray(np.concatenate([branch_state, np.zeros(pad, np.int64)]), jnp.int32),
            np.concatenate([keys, np.repeat(keys[-1:], pad, axis=0)]),
            jnp.asarray(np.concatenate([budgets, np.ones(pad, np.int32)])),
            jnp.int32(size),
            *ids,
            capacity,  # the token buffer's width: a compiled shape that follows the cache length, not the budgets
            sampling,
        )
    tokens, logprobs, lengths, ended_by, steps = jax.device_get((tokens, logprobs, lengths, ended_by, steps))
    return PoolDecoded(
        tokens=np.array(tokens[:size]),
        logprobs=np.array(logprobs[:size]),
        lengths=np.array(lengths[:size]),
        ended_by=[ENDED_BY[int(c)] for c in ended_by[:size]],
        row_steps=int(steps) * rows,
    )


def row_keys_for(seed: int, batch: int) -> jax.Array:
    """``[batch]`` independent PRNG keys derived from ``seed``."""
    return jax.random.split(jax.random.PRNGKey(seed), batch)


def decode_rows(
    model: Any,
    cache: TransformerCache,
    logits: jax.Array,
    budgets: np.ndarray,
    row_keys: jax.Array,
    sampling: Sampling = Sampling(),
    *,
    eos_ids: Sequence[int] = (),
    stop_ids: Sequence[int] = (),
    split: tuple[Any, Any, Any] | None = None,
) -> Decoded:
    """Decodes every row of ``cache`` until its first EOS / stop id or its token budget, with
    the whole loop on the device (no host round trip per token).

    Args:
      model: the model that filled ``cache``; ``split`` is its ``split_module()`` if at hand.
      cache: dense cache; each row continues from its own position (not usable afterwards).
      logits: ``[rows, vocab]`` next-token logits at each row's position.
      budgets: ``[rows]`` most tokens per row (>= 1); the cache must have room for the largest.
      row_keys: ``[rows]`` PRNG keys; token p of row b is drawn with ``fold_in(row_keys[b], p)``.
      sampling: temperature, top-k, top-p and truncation order.
      eos_ids, stop_ids: token ids that end a row (reported as ``eos`` / ``stop``).

    Returns:
      `Decoded` with ``tokens``/``logprobs`` ``[rows, max(budgets)]`` (entries past a row's
      length are not part of it), ``lengths`` and ``ended_by`` per row.
    """
    budgets = np.asarray(budgets, np.int32)
    if budgets.shape != (logits.shape[0],) or np.any(budgets < 1):
        raise ValueError(f"budgets must give one budget >= 1 per row ({logits.shape[0]}), got {budgets.tolist()}")
    if sampling.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {sampling.temperature}")
    steps = int(budgets.max())
    filled = int(jax.device_get(cache.views[0].indexs).max())
    capacity = cache.views[0].key.shape[1]
    if filled + steps > capacity:
        raise ValueError(f"cache of max_length {capacity} has no room for {steps} tokens after position {filled}")
    width = min(step_width(steps), capacity - filled)  # a cache with room for step_width keeps it bucketed
    graphdef, graphstate, graphother = split or model.split_module()
    ids = [np.asarray(sorted(set(map(int, x))), np.int32) for x in (eos_ids, stop_ids)]
    with model.mesh:
        tokens, logprobs, lengths, ended_by, cache, logits = decode_loop_fn()(
            graphdef, graphstate, graphother, cache, logits, row_keys, budgets, *ids, width, sampling
        )
    tokens, logprobs, lengths, ended_by = jax.device_get((tokens, logprobs, lengths, ended_by))
    return Decoded(
        tokens=np.array(tokens[:, :steps]),
        logprobs=np.array(logprobs[:, :steps]),
        cache=cache,
        next_logits=logits,
        lengths=np.array(lengths),
        ended_by=[ENDED_BY[int(c)] for c in ended_by],
    )


def decode(
    model: Any,
    cache: TransformerCache,
    logits: jax.Array,
    num_tokens: int,
    *,
    temperature: float = 0.0,
    row_keys: jax.Array | None = None,
) -> Decoded:
    """Samples exactly ``num_tokens`` tokens per row (no stop tokens), feeding each back through
    the cache (`decode_rows` with one budget for every row).

    Args:
      model: the model that filled ``cache``.
      cache: dense cache; each row continues from its own position.
      logits: ``[batch, vocab]`` next-token logits at each row's position.
      num_tokens: tokens to draw per row (>= 1).
      temperature: sampling temperature, 0 for greedy.
      row_keys: ``[batch]`` PRNG keys (required when temperature > 0).
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    batch = logits.shape[0]
    if row_keys is None:
        if temperature > 0:
            raise ValueError("row_keys are required when temperature > 0")
        row_keys = row_keys_for(0, batch)
    budgets = np.full(batch, num_tokens, np.int32)
    return decode_rows(model, cache, logits, budgets, row_keys, Sampling(temperature=float(temperature)))


def prefill(model: Any, prompt_ids: np.ndarray, prompt_lens: np.ndarray, max_length: int):
    """Runs right-padded prompts ``[batch, P]`` into a fresh cache of ``max_length``.

    Each row's cache is then positioned at its own length ``prompt_lens[b]`` (padding slots are
    overwritten by later tokens and never attended to). Returns ``(cache, logits [batch, vocab])``
    with each row's next-token logits.
    """
    cache = model.init_cache(batch_size=prompt_ids.shape[0], max_length=max_length)
    logits, cache = forward_chunk(model, cache, prompt_ids)
    lens = jnp.asarray(prompt_lens, dtype=jnp.int32)
    for layer, view in enumerate(cache.views):
        cache.views[layer] = view.replace(indexs=jax.device_put(lens, view.indexs.sharding))
    last = jnp.take_along_axis(logits, (lens - 1)[:, None, None], axis=1)[:, 0]
    return cache, last
