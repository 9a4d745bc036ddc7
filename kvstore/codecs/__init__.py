"""KV codecs: how a trajectory's KV block becomes stored arrays, and back.

A codec turns a KV block ``kv`` of shape ``[layers, 2, tokens, kv_heads, head_dim]`` (axis 1:
0 = keys, 1 = values) into named arrays whose axis 2 is the token axis, so the store can chunk
every array along tokens and a prefix read touches only the chunks it needs. Each codec has a
JSON spec recorded in the store's attributes, with a sentence saying how to decode, so a
reader needs nothing from vinekv.

- ``lossless``: the cache dtype as it is (bfloat16 kept as its uint16 bit pattern, since
  zarr-python cannot read bfloat16), zstd-compressed. Bit-exact.
- ``int8``: symmetric absmax quantisation, one float16 scale per (layer, k/v, token, head).
- ``int4``: asymmetric 4-bit codes (KIVI style), two per byte; keys per channel over groups of
  ``group_size`` tokens, values per token; float16 (scale, zero) parameters.
- ``int4-hadamard``: each head vector rotated by a Hadamard matrix (QuaRot style), then
  symmetric 4-bit codes with one float16 scale per (layer, k/v, token, head); exact decode.
"""

from __future__ import annotations

from typing import Any

from vinekv.kvstore.codecs.base import KVCodec, zarr_chunk_codecs
from vinekv.kvstore.codecs.int4 import Int4Codec
from vinekv.kvstore.codecs.int4_hadamard import Int4HadamardCodec
from vinekv.kvstore.codecs.int8 import Int8Codec
from vinekv.kvstore.codecs.lossless import LosslessCodec

CODECS: dict[str, type[KVCodec]] = {
    "lossless": LosslessCodec,
    "int8": Int8Codec,
    "int4": Int4Codec,
    "int4-hadamard": Int4HadamardCodec,
}


def get_codec(codec: str | dict[str, Any] | KVCodec) -> KVCodec:
    """A codec from its name (``"int8"``, ``"int4"``, ``"int4-hadamard"``, ``"lossless"``), its spec dict, or itself."""
    if isinstance(codec, KVCodec):
        return codec
    spec = {"name": codec} if isinstance(codec, str) else dict(codec)
    name = spec.pop("name", None)
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    spec.pop("decode", None)
    return CODECS[name].from_spec(spec)


__all__ = [
    "CODECS",
    "Int4Codec",
    "Int4HadamardCodec",
    "Int8Codec",
    "KVCodec",
    "LosslessCodec",
    "get_codec",
    "zarr_chunk_codecs",
]
