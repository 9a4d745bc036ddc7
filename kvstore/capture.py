"""Capture a prefix's KV state from a model, and resume decoding from a captured state.

The plan's cache-introspection utilities:

- ``capture_state(model, prompt_ids, position)`` runs the prefix ``prompt_ids[:, :position]``
  through a fresh dense cache and copies its K/V to the host.
- ``capture_sequences(model, sequences)`` captures whole rollouts (prompt + response) in
  fixed-size row chunks, for spilling or keeping.
- ``capture_encoded(model, sequences, prompt_lens, codec)`` does the same but encodes each
  rollout with a store codec on the device, so only the codes cross to the host (about half
  the bytes for int8), ready for `SnapshotStore.spill`.
- ``resume_from_state(model, state, continuation_ids)`` writes a snapshot into a fresh cache and
  runs ``continuation_ids`` from its end: no re-prefill of the prefix. Its logits equal those of
  a no-cache forward over ``prefix ++ continuation`` to float tolerance.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from easydel.caching import TransformerCache

from vinekv.kvstore.codecs import KVCodec, get_codec
from vinekv.kvstore.dense_cache import (
    cache_from_states,
    empty_cache,
    extract_rows,
    extract_state,
    forward_chunk,
    kv_layout,
)
from vinekv.kvstore.fingerprint import policy_fingerprint
from vinekv.kvstore.policy import StalePolicyError, check_policy  # noqa: F401 (StalePolicyError: re-export)
from vinekv.kvstore.process import release_free_memory
from vinekv.kvstore.state import CachedState, EncodedState

CAPTURE_BUCKET = 64  # capture widths are rounded up to this many tokens (fewer compiled shapes)


def _token_matrix(ids: Any, name: str, vocab_size: int) -> np.ndarray:
    """``ids`` as an int32 ``[batch, n]`` matrix of valid token ids, or a clear error."""
    arr = np.asarray(jax.device_get(ids))
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be [batch, length], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab_size}): min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int32)


def check_fingerprint(state: CachedState, model: Any) -> None:
    """Raises `StalePolicyError` unless ``state`` was made by ``model``'s current weights."""
    check_policy(state.fingerprint, policy_fingerprint(model), "the snapshot", "capture it again with this model")


def capture_state(model: Any, prompt_ids: Any, position: int) -> CachedState:
    """K/V of positions ``[0, position)`` of ``prompt_ids`` ``[batch, T]`` (T >= position), on host.

    Returns a `CachedState` of ``batch`` rows with the layout and fingerprint of ``model``.
    """
    ids = _token_matrix(prompt_ids, "prompt_ids", kv_layout(model).vocab_size)
    if isinstance(position, bool) or not isinstance(position, int | np.integer):
        raise TypeError(f"position must be an int, got {type(position).__name__}")
    if not 1 <= position <= ids.shape[1]:
        raise ValueError(f"position {position} outside [1, {ids.shape[1]}] (the prompt has {ids.shape[1]} tokens)")
    cache = model.init_cache(batch_size=ids.shape[0], max_length=int(position))
    _, cache = forward_chunk(model, cache, ids[:, :position])
    return extract_state(model, cache, ids, int(position))


def resume_from_state(
    model: Any,
    cached_state: CachedState,
    continuation_ids: Any,
    *,
    max_length: int | None = None,
    check_policy: bool = False,
) -> tuple[jax.Array, TransformerCache]:
    """Resumes from a snapshot and runs ``continuation_ids`` ``[batch, n]`` (n >= 1) after it.

    Args:
      model: an EasyDeL causal LM whose layout matches the snapshot's.
      cached_state: snapshot of ``[0, t)``; a batch-1 snapshot is broadcast to ``batch`` rows.
      continuation_ids: tokens at positions ``[t, t + n)``.
      max_length: capacity of the fresh cache (default ``t + n``); room beyond ``t + n`` is
        for further decoding.
      check_policy: raise `StalePolicyError` unless the snapshot's fingerprint is the model's.

    Returns:
      ``(logits [batch, n, vocab], cache)`` with every row's cache positioned at ``t + n``.
    """
    if not isinstance(cached_state, CachedState):
        raise TypeError(f"cached_state must be a CachedState, got {type(cached_state).__name__}")
    layout = kv_layout(model)
    cached_state.layout.check_compatible(layout)
    if check_policy:
        check_fingerprint(cached_state, model)
    ids = _token_matrix(continuation_ids, "continuation_ids", layout.vocab_size)
    batch, n = ids.shape
    if cached_state.batch not in (1, batch):
        raise ValueError(f"snapshot has {cached_state.batch} rows but continuation_ids has {batch}")
    needed = cached_state.position + n
    max_length = needed if max_length is None else max_length
    if max_length < needed:
        raise ValueError(f"max_length {max_length} < snapshot position {cached_state.position} + {n} new tokens")
    repeats = batch // cached_state.batch
    cache = cache_from_states(model, [cached_state], max_length=max_length, repeats=repeats)
    return forward_chunk(model, cache, ids)


def capture_sequences(
    model: Any, sequences: Sequence[Any], batch_rows: int = 8, *, fingerprint: str | None = None
) -> Iterator[CachedState]:
    """Yields one batch-1 `CachedState` per sequence, covering all of its tokens, in order.

    Sequences (1-D token arrays of any lengths >= 1) are run ``batch_rows`` at a time through
    a fresh dense cache, right-padded to a multiple of 64 tokens (causal attention: padding
    after a token cannot change its KV). Every chunk has the same row count, so capturing the
    same sequences again gives bit-identical KV, whatever else is captured beside them.
    """
    for state, _ in _capture(model, sequences, batch_rows, fingerprint, entropy=False):
        yield state


def capture_with_entropy(
    model: Any, sequences: Sequence[Any], batch_rows: int = 8, *, fingerprint: str | None = None
) -> Iterator[tuple[CachedState, np.ndarray]]:
    """`capture_sequences`, each state with ``[len(seq)]`` float32 next-token entropies (nats):
    entry p is the entropy of the policy's distribution after ``seq[:p + 1]`` (temperature 1),
    from the same forward pass."""
    yield from _capture(model, sequences, batch_rows, fingerprint, entropy=True)


@jax.jit
def next_token_entropy(logits: jax.Array) -> jax.Array:
    """``[..., vocab]`` logits -> ``[...]`` entropy (nats) of their softmax."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -(jnp.exp(logp) * logp).sum(-1)


def capture_encoded(
    model: Any,
    sequences: Sequence[Any],
    prompt_lens: Sequence[int],
    codec: str | dict[str, Any] | KVCodec,
    batch_rows: int = 8,
    *,
    fingerprint: str | None = None,
    entropy: bool = False,
) -> Iterator[tuple[EncodedState, np.ndarray | None]]:
    """`capture_with_entropy` whose states are encoded with ``codec`` on the device.

    Each sequence is encoded by one jitted program per chunk shape, its prompt
    ``[0, prompt_lens[i])`` and response separately when the codec groups tokens (as the store
    keeps them), and only the codes are copied to the host: about half the cache's bytes for
    int8, 0.6x for int4 (two encodings of the chunk's width). Yields ``(EncodedState, entropies
    or None)`` per sequence; the codes equal the host codec's `encode` of the
    `capture_sequences` KV bit for bit.
    """
    codec = get_codec(codec)
    if len(prompt_lens) != len(sequences):
        raise ValueError(f"{len(prompt_lens)} prompt lengths for {len(sequences)} sequences")
    layout = kv_layout(model)
    fingerprint = fingerprint or policy_fingerprint(model)
    for start, cache, ids, chunk, ents in _captured(model, sequences, batch_rows, entropy):
        lens = [len(seq) for seq in chunk]
        plens = [int(p) for p in prompt_lens[start : start + len(chunk)]]
        for i, (plen, n) in enumerate(zip(plens, lens, strict=True)):
            if not 1 <= plen <= n:
                raise ValueError(f"prompt_lens[{start + i}] = {plen} outside [1, {n}] (the sequence's length)")
        # Per-token codecs encode each row once and split it on the host; a codec that groups
        # tokens encodes prompt and response separately (groups start at each part's first
        # token). Segments are padded to the chunk's fixed batch: one compiled shape.
        split = any(group > 1 for group in codec.token_groups().values())
        per_row = 2 if split else 1
        rows = np.repeat(np.arange(batch_rows, dtype=np.int32), per_row)
        starts, counts = np.zeros(per_row * batch_rows, np.int32), np.zeros(per_row * batch_rows, np.int32)
        if split:
            starts[1 : 2 * len(chunk) : 2] = plens
            counts[0 : 2 * len(chunk) : 2] = plens
            counts[1 : 2 * len(chunk) : 2] = np.subtract(lens, plens)
        else:
            counts[: len(chunk)] = lens
        keys, values = [view.key for view in cache.views], [view.value for view in cache.views]
        codes = jax.device_get(_encode_segments(codec)(keys, values, rows, starts, counts))
        for i, (plen, n) in enumerate(zip(plens, lens, strict=True)):
            if split:
                prompt = codec.trim({name: a[2 * i] for name, a in codes.items()}, plen)
                response = codec.trim({name: a[2 * i + 1] for name, a in codes.items()}, n - plen)
            else:
                prompt = codec.trim({name: a[i] for name, a in codes.items()}, plen)
                response = codec.trim({name: a[i, :, :, plen:] for name, a in codes.items()}, n - plen)
            state = EncodedState(prompt, response, codec.spec(), ids[i : i + 1, :n].copy(), plen, layout, fingerprint)
            yield state, (ents[i, :n] if entropy else None)


@functools.lru_cache(maxsize=16)
def _encode_segments(codec: KVCodec) -> Any:
    """Jitted: segments ``(row, start, count)`` of per-layer caches ``[batch, W, heads, dim]``, each
    rotated to start at token 0 (width W; tokens past ``count`` are ignored) and encoded by
    ``codec``. Segments run one after another (`lax.map`), so the temporaries are one segment's."""

    def encode(keys, values, rows, starts, counts):
        def one(segment):
            row, start, count = segment

            def take(layers):
                x = jnp.stack([jax.lax.dynamic_index_in_dim(layer, row, axis=0, keepdims=False) for layer in layers])
                return jnp.roll(x, -start, axis=1)

            return codec._device_encode(take(keys), take(values), count)

        return jax.lax.map(one, (rows, starts, counts))

    return jax.jit(encode)


def _captured(model, sequences, batch_rows, entropy):
    """Yields ``(start, cache, ids, chunk, entropies)`` per chunk of ``batch_rows`` sequences run
    through one fresh dense cache."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    vocab = kv_layout(model).vocab_size
    seqs = [_token_matrix(np.asarray(s)[None], f"sequences[{i}]", vocab)[0] for i, s in enumerate(sequences)]
    split = model.split_module()
    for start in range(0, len(seqs), batch_rows):
        chunk = seqs[start : start + batch_rows]
        width = -(-max(map(len, chunk)) // CAPTURE_BUCKET) * CAPTURE_BUCKET
        ids = np.zeros((batch_rows, width), np.int32)
        for row, seq in enumerate(chunk):
            ids[row, : len(seq)] = seq
        cache = empty_cache(model, batch_rows, width)
        logits, cache = forward_chunk(model, cache, ids, split=split)
        entropies = np.asarray(jax.device_get(next_token_entropy(logits))) if entropy else None
        yield start, cache, ids, chunk, entropies
        del cache, logits
        release_free_memory()  # the chunk's buffers: glibc would keep them (flat peak over long loops)


def _capture(model, sequences, batch_rows, fingerprint, entropy):
    fingerprint = fingerprint or policy_fingerprint(model)
    for _, cache, ids, chunk, entropies in _captured(model, sequences, batch_rows, entropy):
        lengths = [len(seq) for seq in chunk] + [1] * (batch_rows - len(chunk))  # padding rows: 1 position
        for row, state in enumerate(extract_rows(model, cache, ids, lengths, fingerprint)[: len(chunk)]):
            yield state, (entropies[row, : lengths[row]] if entropy else None)
