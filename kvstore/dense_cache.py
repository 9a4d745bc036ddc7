"""EasyDeL dense KV cache (`TransformerCache`) <-> host snapshots, and chunked forward passes.

The dense cache holds, per layer, ``key``/``value`` of shape ``[batch, max_length, kv_heads,
head_dim]`` and ``indexs`` ``[batch]``, the number of filled positions of each row. Rows may
sit at different positions: `forward_chunk` writes each row's chunk at its own ``indexs`` and
masks attention per row, so a ragged batch (snapshots of different lengths, right-padded
prompts) decodes in one call.

`forward_chunk` builds the attention mask for the chunk itself (query ``i`` of row ``b`` sees
keys ``j <= indexs[b] + i``) and marks it causal-baked: with EasyDeL 0.3.0, appending a chunk
of several tokens to a non-empty cache without such a mask gives wrong logits, because the
kernel applies its own causal mask as if the chunk began at position 0.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from easydel.caching import TransformerCache
from ejkernel.types import MaskInfo
from flax import nnx

from vinekv.kvstore.state import CachedState, KVLayout

# `extract_state` slices the device cache at a multiple of this many tokens and cuts the exact
# prefix on the host: an eager slice of another length is another compiled XLA program (a gather
# and a broadcast, ~30-60 ms each on CPU), so cutting at the exact length compiled once per
# trajectory length. The bucket matches the capture widths (`capture.CAPTURE_BUCKET`).
EXTRACT_BUCKET = 64


def kv_layout(model: Any) -> KVLayout:
    """The `KVLayout` of the dense cache ``model`` decodes with."""
    config = model.config.get_text_config()
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return KVLayout(
        num_layers=config.num_hidden_layers,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        dtype=str(np.dtype(config.kvdtype)),
        vocab_size=config.vocab_size,
        model_type=config.model_type,
    )


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of keys and values per token of ``model``'s cache (all layers, its KV dtype)."""
    layout = kv_layout(model)
    return 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * np.dtype(layout.dtype).itemsize


def _chunk_mask(indexs: jax.Array, chunk_len: int, max_length: int) -> MaskInfo:
    """Causal mask ``[batch, 1, chunk_len, max_length]`` for a chunk starting at ``indexs``."""
    query_pos = indexs[:, None] + jnp.arange(chunk_len, dtype=jnp.int32)[None, :]
    allowed = jnp.arange(max_length, dtype=jnp.int32)[None, None, :] <= query_pos[:, :, None]
    mask = MaskInfo.from_attention_mask(allowed[:, None])
    # Tells EasyDeL's attention not to apply its own (chunk-relative) causal mask on top.
    object.__setattr__(mask, "_causal_baked", True)
    return mask


def _cache_indexs(cache: TransformerCache) -> jax.Array:
    return cache.views[0].indexs


def forward_split(graphdef, graphstate, graphother, cache, input_ids):
    """Pure, jittable `forward_chunk` over a model split by ``model.split_module()``."""
    model = nnx.merge(graphdef, graphstate, graphother)
    indexs = _cache_indexs(cache)
    chunk_len = input_ids.shape[1]
    positions = indexs[:, None] + jnp.arange(chunk_len, dtype=jnp.int32)[None, :]
    mask = _chunk_mask(indexs, chunk_len, cache.views[0].key.shape[1])
    out = model(input_ids=input_ids, position_ids=positions, past_key_values=cache, mask_info=mask)
    return out.logits, out.past_key_values


@functools.cache
def _jitted_forward():
    donate = () if jax.default_backend() == "cpu" else (3,)
    return jax.jit(forward_split, static_argnums=(0,), donate_argnums=donate)


def forward_chunk(
    model: Any, cache: TransformerCache, input_ids: Any, split: tuple[Any, Any, Any] | None = None
) -> tuple[jax.Array, TransformerCache]:
    """Runs ``input_ids`` ``[batch, n]`` through ``model`` from each row's cache position.

    Returns the logits ``[batch, n, vocab]`` and the cache advanced by ``n`` positions. The
    input cache must not be used afterwards (its buffers may be donated). ``split`` is
    ``model.split_module()`` when the caller already has it (splitting a large model costs).
    """
    _check_dense(cache)
    input_ids = jnp.asarray(input_ids, dtype=jnp.int32)
    graphdef, graphstate, graphother = split or model.split_module()
    with model.mesh:
        return _jitted_forward()(graphdef, graphstate, graphother, cache, input_ids)


def _check_dense(cache: Any) -> None:
    if not isinstance(cache, TransformerCache):
        raise TypeError(f"expected EasyDeL's dense TransformerCache, got {type(cache).__name__}")
    max_length = cache.views[0].key.shape[1]
    for view in cache.views:
        if view.key.shape[1] != max_length:
            raise ValueError("sliding-window cache views (shorter than max_length) are not supported")


def extract_state(
    model: Any,
    cache: TransformerCache,
    token_ids: Any,
    position: int,
    rows: Sequence[int] | None = None,
    fingerprint: str | None = None,
) -> CachedState:
    """Copies positions ``[0, position)`` of the chosen rows of a live cache to the host.

    The device copy covers ``position`` rounded up to a multiple of `EXTRACT_BUCKET` (at most the
    cache's length) and is cut on the host: one compiled program per bucket, not per position.

    Args:
      model: the model that filled ``cache``.
      cache: a dense cache whose chosen rows hold at least ``position`` positions.
      token_ids: ``[batch, >= position]`` tokens of the cache's rows.
      position: prefix length ``t`` to copy.
      rows: batch rows to keep (default: all).
      fingerprint: the model's `policy_fingerprint`, when the caller already has it.

    Returns:
      A `CachedState` with ``batch = len(rows)``.
    """
    from vinekv.kvstore.fingerprint import policy_fingerprint

    _check_dense(cache)
    token_ids = np.asarray(token_ids)
    batch = cache.views[0].key.shape[0]
    rows = np.arange(batch) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.size == 0 or rows.min() < 0 or rows.max() >= batch:
        raise ValueError(f"rows {rows.tolist()} outside the cache's batch of {batch}")
    filled = np.asarray(jax.device_get(_cache_indexs(cache)))[rows]
    if not 1 <= position <= int(filled.min()):
        raise ValueError(f"position {position} outside [1, {int(filled.min())}] filled in rows {rows.tolist()}")
    if token_ids.ndim != 2 or token_ids.shape[0] != batch or token_ids.shape[1] < position:
        raise ValueError(f"token_ids shape {token_ids.shape} must be [{batch}, >= {position}]")
    width = min(cache.views[0].key.shape[1], -(-position // EXTRACT_BUCKET) * EXTRACT_BUCKET)
    picked = jax.device_get([(v.key[rows, :width], v.value[rows, :width]) for v in cache.views])
    return CachedState(
        keys=np.stack([k[:, :position] for k, _ in picked]),
        values=np.stack([v[:, :position] for _, v in picked]),
        token_ids=token_ids[rows, :position].astype(np.int32),
        layout=kv_layout(model),
        fingerprint=fingerprint or policy_fingerprint(model),
    )


def extract_rows(
    model: Any, cache: TransformerCache, token_ids: np.ndarray, lengths: Sequence[int], fingerprint: str
) -> list[CachedState]:
    """One batch-1 `CachedState` per row of ``cache``, row ``b`` covering its first ``lengths[b]``
    positions (``token_ids`` ``[batch, >= max(lengths)]``): `extract_state` for every row with a
    single device-to-host copy of the cache's first ``max(lengths)`` positions (bucketed)."""
    _check_dense(cache)
    lengths = [int(n) for n in lengths]
    filled = np.asarray(jax.device_get(_cache_indexs(cache)))
    if len(lengths) != filled.shape[0] or any(not 1 <= n <= f for n, f in zip(lengths, filled, strict=True)):
        raise ValueError(f"lengths {lengths} must give each of the cache's {filled.shape[0]} rows 1..its filled length")
    width = min(cache.views[0].key.shape[1], -(-max(lengths) // EXTRACT_BUCKET) * EXTRACT_BUCKET)
    keys, values = jax.device_get(([v.key[:, :width] for v in cache.views], [v.value[:, :width] for v in cache.views]))
    keys, values, layout = np.stack(keys), np.stack(values), kv_layout(model)
    return [
        CachedState(
            keys=keys[:, row : row + 1, :n].copy(),
            values=values[:, row : row + 1, :n].copy(),
            token_ids=np.asarray(token_ids[row : row + 1, :n], np.int32),
            layout=layout,
            fingerprint=fingerprint,
        )
        for row, n in enumerate(lengths)
    ]


def cache_from_states(model: Any, states: Sequence[CachedState], max_length: int, repeats: int = 1) -> TransformerCache:
    """A fresh dense cache holding the given snapshots, each row repeated ``repeats`` times.

    Row order: for each state, for each of its rows, ``repeats`` consecutive copies (K
    branches of one snapshot sit side by side). Row ``r`` has ``indexs[r]`` = its snapshot's
    position; snapshots of different lengths may share the cache. K/V are cast to the cache
    dtype.

    Raises:
      ValueError: a snapshot's layout does not match ``model``, or ``max_length`` is shorter
        than a snapshot.
    """
    if not states:
        raise ValueError("no snapshots given")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    layout = kv_layout(model)
    for state in states:
        state.layout.check_compatible(layout)
    longest = max(state.position for state in states)
    if max_length < longest:
        raise ValueError(f"max_length {max_length} is shorter than the longest snapshot ({longest} positions)")
    positions = np.concatenate([np.full(s.batch, s.position) for s in states]).astype(np.int32)
    lengths = np.repeat(positions, repeats)
    template = _cache_template(model, lengths.size, max_length)
    dtype = np.dtype(template.views[0].key.dtype)
    if broadcast_on_device():  # snapshot rows cross once, padded to a bucket; `repeats` copies made there
        bucket = min(max_length, -(-longest // INJECT_BUCKET) * INJECT_BUCKET)
        rows = [_padded_rows(states, part, bucket) for part in ("keys", "values")]
        keys, values = _expand_rows(*rows, repeats=repeats, max_length=max_length, dtype=dtype)
    else:  # host memory is device memory: numpy broadcasts bfloat16 ~2x faster than XLA:CPU
        keys, values = (_host_rows(states, part, repeats, max_length, dtype) for part in ("keys", "values"))
    indexs = jax.device_put(lengths, template.views[0].indexs.sharding)
    views = [
        view.replace(
            key=jax.device_put(keys[layer], view.key.sharding),
            value=jax.device_put(values[layer], view.value.sharding),
            indexs=jax.device_put(indexs, view.indexs.sharding),
        )
        for layer, view in enumerate(template.views)
    ]
    return TransformerCache(views=views)


INJECT_BUCKET = 64  # snapshot rows go to the device padded to a multiple of this many tokens


def broadcast_on_device() -> bool:
    """Whether `cache_from_states` copies snapshots to the device once and repeats rows there
    (accelerators) rather than building the cache on the host (the CPU backend)."""
    return jax.default_backend() != "cpu"


def _host_rows(states: Sequence[CachedState], part: str, repeats: int, max_length: int, dtype: Any) -> np.ndarray:
    """``[layers, rows * repeats, max_length, kv_heads, head_dim]`` of ``part`` built on the host."""
    first = np.asarray(getattr(states[0], part))
    rows = sum(s.batch for s in states) * repeats
    out = np.zeros((first.shape[0], rows, max_length, *first.shape[3:]), dtype)
    row = 0
    for state in states:
        block = np.asarray(getattr(state, part))
        for b in range(state.batch):  # each snapshot row broadcast into its `repeats` cache rows
            out[:, row : row + repeats, : state.position] = block[:, b : b + 1]
            row += repeats
    return out


def _padded_rows(states: Sequence[CachedState], part: str, bucket: int) -> Any:
    """``[layers, rows, bucket, kv_heads, head_dim]``: every state's rows of ``part`` (keys or
    values), zero-padded to ``bucket`` tokens (the cache is zero past each row's position);
    assembled on the host unless a state is on the device."""
    arrays = [getattr(s, part) for s in states]
    if all(isinstance(a, np.ndarray) for a in arrays):
        first, dtype = arrays[0], np.result_type(*arrays)  # no snapshot is rounded to another's dtype
        out = np.zeros((first.shape[0], sum(a.shape[1] for a in arrays), bucket, *first.shape[3:]), dtype)
        row = 0
        for a in arrays:
            out[:, row : row + a.shape[1], : a.shape[2]] = a
            row += a.shape[1]
        return out
    padded = [jnp.pad(jnp.asarray(a), [(0, 0), (0, 0), (0, bucket - a.shape[2]), (0, 0), (0, 0)]) for a in arrays]
    return jnp.concatenate(padded, axis=1) if len(padded) > 1 else padded[0]


@functools.partial(jax.jit, static_argnames=("repeats", "max_length", "dtype"))
def _expand_rows(keys, values, *, repeats: int, max_length: int, dtype: Any):
    """Per-layer cache buffers ``[rows * repeats, max_length, kv_heads, head_dim]`` in ``dtype``:
    each zero-padded snapshot row repeated ``repeats`` times, zero-padded to ``max_length``."""

    def expand(x):
        x = jnp.repeat(x, repeats, axis=1).astype(dtype)
        return list(jnp.pad(x, [(0, 0), (0, 0), (0, max_length - x.shape[2]), (0, 0), (0, 0)]))

    return expand(keys), expand(values)


def empty_cache(model: Any, batch: int, max_length: int) -> TransformerCache:
    """A zeroed dense cache of ``batch`` rows and ``max_length`` positions, as ``init_cache``
    gives, from the model's cached template (``init_cache`` re-derives the cache type and
    shardings on every call)."""
    template = _cache_template(model, batch, max_length)
    return TransformerCache(
        views=[
            view.replace(key=_zeros(view.key), value=_zeros(view.value), indexs=jnp.zeros_like(view.indexs))
            for view in template.views
        ]
    )


def _zeros(like: jax.ShapeDtypeStruct) -> jax.Array:
    return jnp.zeros(like.shape, like.dtype, device=like.sharding)


_TEMPLATES: dict[int, dict[tuple[int, int], TransformerCache]] = {}


def _cache_template(model: Any, batch: int, max_length: int) -> TransformerCache:
    """An empty cache of this shape, built once per model: its views supply structure and
    shardings only; their keys and values are `jax.ShapeDtypeStruct` (no buffers kept)."""
    if id(model) not in _TEMPLATES:  # forgotten when the model is garbage-collected
        weakref.finalize(model, _TEMPLATES.pop, id(model), None)
    per_model = _TEMPLATES.setdefault(id(model), {})
    if (batch, max_length) not in per_model:
        if len(per_model) >= 32:  # shapes in use: row buckets x length buckets (init_cache costs ~20-50 ms)
            per_model.pop(next(iter(per_model)))
        cache = model.init_cache(batch_size=batch, max_length=max_length)
        _check_dense(cache)
        abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)  # noqa: E731
        per_model[(batch, max_length)] = TransformerCache(
            views=[view.replace(key=abstract(view.key), value=abstract(view.value)) for view in cache.views]
        )
    return per_model[(batch, max_length)]
