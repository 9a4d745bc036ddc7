"""What `SnapshotStore.spill` refuses before anything is queued: token ids outside the model's
vocabulary and KV holding NaN/Inf. Stored, either would only surface later as damage (a
decoding error, or with int4 a whole 32-value group turned non-finite by one NaN). JAX is
imported only for device arrays: a process that writes host arrays never loads it."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from vinekv.kvstore.codecs.base import StoredArray
from vinekv.kvstore.state import CachedState, EncodedState


def check_token_ids(token_ids: np.ndarray, vocab_size: int) -> None:
    """Raises ValueError naming the first id of ``token_ids`` ``[1, T]`` outside ``[0, vocab_size)``."""
    ids = np.asarray(token_ids)[0]
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        p = int(bad[0])
        raise ValueError(
            f"token id {int(ids[p])} at position {p} is outside [0, {vocab_size}) (the model's vocabulary): "
            "refusing to store the trajectory"
        )


def _all_finite(array: Any) -> bool:
    if isinstance(array, np.ndarray):
        return bool(np.isfinite(array).all())
    import jax.numpy as jnp  # a device array (its caller imported JAX): one scalar crosses, not the array

    return bool(jnp.isfinite(array).all())


def _floating(dtype: Any) -> bool:
    """Whether ``dtype`` is a float type, ml_dtypes' (bfloat16, float8) included."""
    dtype = np.dtype(dtype)
    return np.issubdtype(dtype, np.floating) or dtype.type in _ML_FLOATS


_ML_FLOATS = {ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2}


def check_finite(state: CachedState | EncodedState) -> None:
    """Raises ValueError when the KV of ``state`` holds NaN or Inf: for a `CachedState` naming the
    first layer and position, for an `EncodedState` the codec array that shows it (a codec's
    float arrays, raw KV or scales, are non-finite wherever the KV was)."""
    if isinstance(state, CachedState):
        for name in ("keys", "values"):
            array = getattr(state, name)  # [layers, 1, T, kv_heads, head_dim]
            if not _all_finite(array):
                layer, _, position = (int(i) for i in np.argwhere(~np.isfinite(np.asarray(array)))[0][:3])
                raise ValueError(
                    f"{name} hold non-finite numbers (NaN/Inf) at layer {layer}, position {position}: "
                    "refusing to store the trajectory"
                )
        return
    for part, arrays in (("prompt", state.prompt), ("response", state.response)):
        for name, stored in arrays.items():
            data = stored.data if isinstance(stored, StoredArray) else stored
            if _floating(data.dtype) and not _all_finite(data):
                raise ValueError(
                    f"the encoded {part} array {name!r} holds non-finite numbers (the KV had NaN/Inf): "
                    "refusing to store the trajectory"
                )
