"""The codec interface and the zarr v3 codec chain every stored chunk goes through."""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import numpy as np

KV_DIMS = ("layer", "kv", "token", "kv_head", "head_dim")


def zarr_chunk_codecs(zstd_level: int) -> list[dict[str, Any]]:
    """Inner-chunk codecs: little-endian bytes -> zstd (level 0: none) -> crc32c (detects corruption)."""
    zstd = [{"name": "zstd", "configuration": {"level": zstd_level, "checksum": False}}] if zstd_level else []
    return [{"name": "bytes", "configuration": {"endian": "little"}}, *zstd, {"name": "crc32c"}]


@dataclasses.dataclass(frozen=True)
class StoredArray:
    """One array a codec stores: its data (token axis 2) and the dimension names."""

    data: np.ndarray
    dims: tuple[str, ...]


class KVCodec(abc.ABC):
    """Encodes ``[layers, 2, tokens, kv_heads, head_dim]`` KV blocks into token-chunkable arrays."""

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

        ``raw_dtype`` is the dtype the KV had when it was spilled.
        """

    @abc.abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON spec: ``name``, parameters, and a ``decode`` sentence for third-party readers."""

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


def check_zstd_level(level: int) -> int:
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 22:
        raise ValueError(f"zstd_level must be an int in [0, 22] (0 = no zstd), got {level!r}")
    return level
