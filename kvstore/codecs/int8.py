"""int8 codec: symmetric absmax quantisation, one float16 scale per (layer, k/v, token, head).

    scale[l, c, t, h] = max_d |kv[l, c, t, h, d]| / 127
    q[l, c, t, h, d]  = round(kv[l, c, t, h, d] / scale[l, c, t, h])   (int8, in [-127, 127])
    kv'[l, c, t, h, d] = q[l, c, t, h, d] * scale[l, c, t, h]

A zero vector has scale 0 and decodes to zeros. The reconstruction error of an element is at
most ``scale / 2`` (plus float16 rounding of the scale). Scales are per token, so any prefix
decodes from its own chunks alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvstore.codecs.base import KV_DIMS, KVCodec, StoredArray, check_zstd_level

QMAX = 127


class Int8Codec(KVCodec):
    name = "int8"

    def __init__(self, zstd_level: int = 3):
        self.zstd_level = check_zstd_level(zstd_level)

    def encode(self, kv: np.ndarray) -> dict[str, StoredArray]:
        x = kv.astype(np.float32)
        scale = (np.abs(x).max(axis=-1) / QMAX).astype(np.float16)
        safe = np.where(scale > 0, scale, 1).astype(np.float32)[..., None]
        q = np.clip(np.rint(x / safe), -QMAX, QMAX).astype(np.int8)
        return {"q": StoredArray(q, KV_DIMS), "scale": StoredArray(scale, KV_DIMS[:-1])}

    def decode(self, arrays: dict[str, np.ndarray], raw_dtype: str, out_dtype: Any) -> np.ndarray:
        kv = arrays["q"].astype(np.float32) * arrays["scale"].astype(np.float32)[..., None]
        return kv.astype(out_dtype, copy=False)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "zstd_level": self.zstd_level,
            "decode": "kv[l, c, t, h, d] = float32(q[l, c, t, h, d]) * float32(scale[l, c, t, h]); "
            "c = 0 keys, 1 values; q is int8, scale float16 = absmax over d / 127",
        }
