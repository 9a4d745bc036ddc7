"""int8 codec: symmetric absmax quantisation, one float16 scale per (layer, k/v, token, head).

    scale[l, c, t, h] = float16(max_d |kv[l, c, t, h, d]| * float32(1 / 127))
    q[l, c, t, h, d]  = round(kv[l, c, t, h, d] / scale[l, c, t, h])   (int8, in [-127, 127])
    kv'[l, c, t, h, d] = q[l, c, t, h, d] * scale[l, c, t, h]

All arithmetic in float32, rounding half to even. The scale multiplies by the float32
reciprocal of 127 rather than dividing: XLA rewrites a division by a constant into that
multiplication, so this is what the device kernel computes, and the host does the same. A zero
vector has scale 0 and decodes to zeros. The reconstruction error of an element is at most
``scale / 2`` (plus float16 rounding of the scale). Scales are per token, so any prefix decodes
from its own chunks alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vinekv.kvstore.codecs.base import KV_DIMS, KVCodec, StoredArray, check_zstd_level

QMAX = 127
INV_QMAX = np.float32(1 / QMAX)


def _cast(x: np.ndarray, dtype: Any) -> np.ndarray:
    return x if x.dtype == dtype else x.astype(dtype)


class Int8Codec(KVCodec):
    name = "int8"
    array_names = ("q", "scale")

    def __init__(self, zstd_level: int = 1):
        self.zstd_level = check_zstd_level(zstd_level)

    def dims(self, name: str) -> tuple[str, ...]:
        return KV_DIMS if name == "q" else KV_DIMS[:-1]

    def encode(self, keys: np.ndarray, values: np.ndarray) -> dict[str, StoredArray]:
        layers, tokens, heads, head_dim = keys.shape
        q = np.empty((layers, 2, tokens, heads, head_dim), np.int8)
        scale = np.empty((layers, 2, tokens, heads), np.float16)
        for layer in range(layers):  # one layer at a time: cache-sized blocks, ~3x faster
            for c, part in enumerate((keys, values)):
                x = _cast(part[layer], np.float32)
                scale[layer, c] = np.abs(x).max(axis=-1, initial=0) * INV_QMAX
                safe = np.where(scale[layer, c] > 0, scale[layer, c], np.float16(1)).astype(np.float32)
                q[layer, c] = np.clip(np.rint(x / safe[..., None]), -QMAX, QMAX)
        return {"q": StoredArray(q, KV_DIMS), "scale": StoredArray(scale, KV_DIMS[:-1])}

    def decode(self, arrays: dict[str, np.ndarray], raw_dtype: str, out_dtype: Any) -> np.ndarray:
        q, scale = arrays["q"], arrays["scale"].astype(np.float32)[..., None]
        out = np.empty(q.shape, np.dtype(out_dtype))
        for layer in range(q.shape[0]):
            out[layer] = np.multiply(q[layer], scale[layer], dtype=np.float32)
        return out

    def _device_encode(self, keys: Any, values: Any, length: Any) -> dict[str, Any]:
        import jax.numpy as jnp

        x = jnp.stack([keys, values], axis=1).astype(jnp.float32)
        scale = (jnp.abs(x).max(axis=-1) * INV_QMAX).astype(jnp.float16)
        safe = jnp.where(scale > 0, scale, jnp.float16(1)).astype(jnp.float32)[..., None]
        return {"q": jnp.clip(jnp.rint(x / safe), -QMAX, QMAX).astype(jnp.int8), "scale": scale}

    def _device_decode(self, arrays: dict[str, Any], raw_dtype: str, out_dtype: Any) -> Any:
        import jax.numpy as jnp

        q, scale = arrays["q"], arrays["scale"]
        return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(out_dtype)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "zstd_level": self.zstd_level,
            "decode": "kv[l, c, t, h, d] = float32(q[l, c, t, h, d]) * float32(scale[l, c, t, h]); "
            "c = 0 keys, 1 values; q is int8, scale float16 = absmax over d * float32(1/127)",
        }
