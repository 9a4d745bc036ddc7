"""Token-by-token decoding from a dense cache, reproducible from any prefix.

The token at absolute position ``p`` of row ``b`` is drawn with the key
``fold_in(row_keys[b], p)``: it depends on the row's key and the position only, so decoding
resumed from a snapshot at ``t`` with the same row key draws exactly the tokens an
uninterrupted decode draws after ``t``. ``temperature == 0`` is greedy (argmax).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from easydel.caching import TransformerCache

from kvstore.dense_cache import forward_chunk, forward_split


@dataclasses.dataclass
class Decoded:
    """Result of `decode`.

    Attributes:
      tokens: ``[batch, n]`` int32 sampled tokens.
      logprobs: ``[batch, n]`` float32 log-probability of each sampled token under the
        sampling distribution (logits / temperature; raw logits when greedy).
      cache: the cache holding every sampled token, ready for further decoding.
      next_logits: ``[batch, vocab]`` next-token logits after the last sampled token.
    """

    tokens: np.ndarray
    logprobs: np.ndarray
    cache: TransformerCache
    next_logits: jax.Array


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


def _step(
    graphdef, graphstate, graphother, cache, logits, row_keys, temperature, top_k=0, top_p=1.0, sampler="generate"
):
    tokens, logprobs = sample_tokens(logits, row_keys, cache.views[0].indexs, temperature, top_k, top_p, sampler)
    new_logits, cache = forward_split(graphdef, graphstate, graphother, cache, tokens[:, None])
    return tokens, logprobs, new_logits[:, -1], cache


@functools.cache
def decode_step_fn():
    """The jitted sample-then-forward step (model split; sampling settings static)."""
    donate = () if jax.default_backend() == "cpu" else (3,)
    return jax.jit(_step, static_argnums=(0, 6, 7, 8, 9), donate_argnums=donate)


def row_keys_for(seed: int, batch: int) -> jax.Array:
    """``[batch]`` independent PRNG keys derived from ``seed``."""
    return jax.random.split(jax.random.PRNGKey(seed), batch)


def decode(
    model: Any,
    cache: TransformerCache,
    logits: jax.Array,
    num_tokens: int,
    *,
    temperature: float = 0.0,
    row_keys: jax.Array | None = None,
) -> Decoded:
    """Samples ``num_tokens`` tokens per row, feeding each back through the cache.

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
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    batch = logits.shape[0]
    filled = int(jax.device_get(cache.views[0].indexs).max())
    capacity = cache.views[0].key.shape[1]
    if filled + num_tokens > capacity:
        raise ValueError(f"cache of max_length {capacity} has no room for {num_tokens} tokens after position {filled}")
    if row_keys is None:
        if temperature > 0:
            raise ValueError("row_keys are required when temperature > 0")
        row_keys = row_keys_for(0, batch)
    step = decode_step_fn()
    graphdef, graphstate, graphother = model.split_module()
    tokens, logprobs = [], []
    with model.mesh:
        for _ in range(num_tokens):
            tok, lp, logits, cache = step(
                graphdef, graphstate, graphother, cache, logits, row_keys, float(temperature), 0, 1.0, "generate"
            )
            tokens.append(tok)
            logprobs.append(lp)
    return Decoded(
        tokens=np.stack(jax.device_get(tokens), axis=1),
        logprobs=np.stack(jax.device_get(logprobs), axis=1),
        cache=cache,
        next_logits=logits,
    )


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
