"""The codec interface and the zarr v3 codec chain every stored chunk goes through.

A codec has two implementations of the same arithmetic that must agree bit for bit:

- host (numpy): `encode` / `decode`, used for snapshots that are already on the host and by
  third-party-style readers; no JAX, so the store's writer threads can run it in parallel;
- device (jitted JAX): `device_encode` / `device_decode`, used right after capture (only the
  codes cross to the host) and right after a read (only the codes cross to the device).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any

import numpy as np

KV_DIMS = ("layer", "kv", "token", "kv_head", "head_dim")


def zarr_chunk_codecs(zstd_level: int) -> list[dict[str, Any]]:
    """Inner-chunk codecs: little-endian bytes -> zstd (level 0: none) -> crc32c (detects corruption)."""
    zstd = [{"name": "zstd", "configuration": {"level": zstd_level, "checksum": False}}] if zstd_level else []
    return [{"name": "bytes", "configuration": {"endian": "little"}}, *zstd, {"name": "crc32c"}]


@dataclasses.dataclass(frozen=True)
class StoredArray:
    """One array a codec stores: its data (token axis 2), dimension names, and how many tokens
    one index of the token axis covers (1: per token; G: one entry per group of G tokens)."""

    data: np.ndarray
    dims: tuple[str, ...]
    token_group: int = 1


def token_entries(tokens: int, token_group: int) -> int:
    """Entries of a token axis covering ``tokens`` tokens in groups of ``token_group`` (ceil)."""
    return -(-tokens // token_group)


class KVCodec(abc.ABC):
    """Encodes ``[layers, 2, tokens, kv_heads, head_dim]`` KV blocks into token-chunkable arrays.

    Subclasses set ``name``, ``array_names``, ``zstd_level`` and implement the host pair
    (`encode`, `decode`), the device pair (`_device_encode`, `_device_decode`) and `spec`.
    """

    name: str
    array_names: tuple[str, ...]  # the arrays `encode` returns, hence the arrays a node stores
    zstd_level: int

    @abc.abstractmethod
    def encode(self, keys: np.ndarray, values: np.ndarray) -> dict[str, StoredArray]:
        """Arrays to store for ``keys``/``values`` ``[layers, tokens, kv_heads, head_dim]``.

        The KV block they describe is ``stack([keys, values], axis=1)``; every stored array has
        the token axis at 2.
        """

    @abc.abstractmethod
    def decode(self, arrays: dict[str, np.ndarray], raw_dtype: str, out_dtype: Any) -> np.ndarray:
        """KV block ``[layers, 2, t, kv_heads, head_dim]`` in ``out_dtype`` from stored arrays.

        ``raw_dtype`` is the dtype the KV had when it was spilled. Arrays with a token group
        ``G > 1`` hold ``ceil(t / G)`` entries; ``t`` is the token count of the per-token arrays.
        """

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON spec: ``name``, parameters, and a ``decode`` sentence for third-party readers."""

    def token_groups(self) -> dict[str, int]:
        """Tokens per token-axis entry of each stored array (1 unless the codec groups tokens)."""
        return dict.fromkeys(self.array_names, 1)

    @abc.abstractmethod
    def _device_encode(self, keys: Any, values: Any, length: Any) -> dict[str, Any]:
        """Traceable `encode` of ``[layers, W, kv_heads, head_dim]`` K/V whose first ``length``
        (a traced int) tokens are real; entries past them are dropped by `trim`."""

    @abc.abstractmethod
    def _device_decode(self, arrays: dict[str, Any], raw_dtype: str, out_dtype: Any) -> Any:
        """Traceable `decode`."""

    def device_encode(self, keys: Any, values: Any, length: int | Any) -> dict[str, Any]:
        """`encode` on the device: jax arrays of static width ``W``, codes of the first ``length``
        tokens (use `trim` on the host copy). One compiled program per shape, not per length."""
        return _jitted(self, "encode")(keys, values, length)

    def device_decode(self, arrays: dict[str, Any], raw_dtype: str, out_dtype: Any) -> Any:
        """`decode` on the device (jax arrays in and out), bit-identical to the host `decode`."""
        return _jitted(self, "decode", raw_dtype, np.dtype(out_dtype).name)(arrays)

    def trim(self, arrays: dict[str, np.ndarray], length: int) -> dict[str, StoredArray]:
        """Device codes of width ``W`` cut to the entries of the first ``length`` tokens (copies:
        the result does not keep the whole width-``W`` buffer alive)."""
        groups = self.token_groups()
        return {
            name: StoredArray(np.array(arrays[name][:, :, : token_entries(length, g)]), self.dims(name), g)
            for name, g in groups.items()
        }

    def dims(self, name: str) -> tuple[str, ...]:
        """Dimension names of stored array ``name`` (default: the KV dims)."""
        return KV_DIMS

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> KVCodec:
        return cls(**spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KVCodec) and self.spec() == other.spec()

    def __hash__(self) -> int:
        return hash(str(sorted(self.spec().items())))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.spec().items() if k not in ("name", "decode"))
        return f"{type(self).__name__}({params})"


@functools.lru_cache(maxsize=64)
def _jitted(codec: KVCodec, direction: str, *static: str) -> Any:
    import jax

    if direction == "encode":
        return jax.jit(codec._device_encode)
    raw_dtype, out_dtype = static
    return jax.jit(lambda arrays: codec._device_decode(arrays, raw_dtype, out_dtype))


def check_zstd_level(level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 22:
        raise ValueError(f"zstd_level must be an int in [0, 22] (0 = no zstd), got {level!r}")
    return level
