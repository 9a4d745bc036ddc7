"""Lossless codec: KV in its cache dtype, zstd-compressed; decoding is bit-exact."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from vinekv.kvstore.codecs.base import KV_DIMS, KVCodec, StoredArray, check_zstd_level

# zarr-python 3 cannot read bfloat16 arrays, so bfloat16 is stored as its uint16 bit pattern.
_BITS = {"bfloat16": np.uint16}


class LosslessCodec(KVCodec):
    name = "lossless"
    array_names = ("kv",)

    def __init__(self, zstd_level: int = 1):
        self.zstd_level = check_zstd_level(zstd_level)

    def encode(self, keys: np.ndarray, values: np.ndarray) -> dict[str, StoredArray]:
        kv = np.stack([keys, values], axis=1)
        bits = _BITS.get(str(kv.dtype))
        return {"kv": StoredArray(kv.view(bits) if bits is not None else kv, KV_DIMS)}

    def decode(self, arrays: dict[str, np.ndarray], raw_dtype: str, out_dtype: Any) -> np.ndarray:
        data = arrays["kv"]
        if raw_dtype in _BITS:
            data = data.view(ml_dtypes.bfloat16)
        return data.astype(out_dtype, copy=False)

    def _device_encode(self, keys: Any, values: Any, length: Any) -> dict[str, Any]:
        import jax
        import jax.numpy as jnp

        kv = jnp.stack([keys, values], axis=1)
        bits = _BITS.get(str(kv.dtype))
        return {"kv": jax.lax.bitcast_convert_type(kv, bits) if bits is not None else kv}

    def _device_decode(self, arrays: dict[str, Any], raw_dtype: str, out_dtype: Any) -> Any:
        import jax

        data = arrays["kv"]
        if raw_dtype in _BITS:
            data = jax.lax.bitcast_convert_type(data, ml_dtypes.bfloat16)
        return data.astype(out_dtype)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "zstd_level": self.zstd_level,
            "decode": "kv = array 'kv' as stored; where the store's layout dtype is bfloat16 the uint16 "
            "values are the bfloat16 bit patterns (reinterpret, do not convert)",
        }
