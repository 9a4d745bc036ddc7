"""Digests that seal the store's metadata, and the content key of a prompt node.

Every committed node's attributes carry ``digest``: blake2b-128 of the canonical JSON
(sorted keys, no spaces, ASCII) of the attributes without ``digest``. A trajectory or prompt
node's attributes also record each stored array's metadata digest (``arrays``), so a reader
checks a node and its arrays' ``zarr.json`` before trusting them. Pure functions, no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import zlib
from collections.abc import Mapping
from typing import Any

import ml_dtypes  # noqa: F401  (registers bfloat16 and the other ml_dtypes names with numpy)
import numpy as np

from vinekv.kvstore.errors import CorruptMetadataError
from vinekv.kvstore.state import KVLayout

DIGEST = "digest"
ATTEMPT = re.compile(r"attempt-(\d{13})-[0-9a-f]{12}")  # a node's data folder on stores without rename


def canonical_json(value: Any) -> bytes:
    """The one byte string a JSON value digests as (sorted keys, compact, ASCII)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def json_digest(value: Any) -> str:
    """blake2b-128 hex digest of ``canonical_json(value)``."""
    return hashlib.blake2b(canonical_json(value), digest_size=16).hexdigest()


def chunk_hashes(codes: np.ndarray, chunk_entries: int) -> list[str]:
    """The content hash of each chunk of ``codes`` (token axis 2, ``chunk_entries`` entries per
    chunk, the last one as long as what is left): CRC-32 of its bytes in C order, as 8 hex digits.
    A node seals them and reads check them: they tell a node's own bytes from another node's, not
    forgeries. (One copy and one CRC call per chunk: a CRC chained block by block over the leading
    axes, which the first stores recorded, is the same number, and cost 2x more in calls.)"""
    return [
        f"{zlib.crc32(np.ascontiguousarray(codes[:, :, lo : lo + chunk_entries]).view(np.uint8)):08x}"
        for lo in range(0, codes.shape[2], chunk_entries)
    ]


def seal(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """``attrs`` with its ``digest`` (re)computed over everything else."""
    body = {k: v for k, v in attrs.items() if k != DIGEST}
    return {**body, DIGEST: json_digest(body)}


def check_sealed(attrs: Any, where: str) -> dict[str, Any]:
    """``attrs`` if its digest matches, else `CorruptMetadataError` naming ``where`` (a file)."""
    if not isinstance(attrs, dict):
        raise CorruptMetadataError(f"{where}: attributes.vinekv is {type(attrs).__name__}, not an object")
    if DIGEST not in attrs:
        raise CorruptMetadataError(f"{where}: no metadata digest (attributes.vinekv.digest)")
    body = {k: v for k, v in attrs.items() if k != DIGEST}
    if json_digest(body) != attrs[DIGEST]:
        raise CorruptMetadataError(f"{where}: metadata does not match its digest (the file was altered)")
    return attrs


def group_attrs(node: dict[str, Any], where: str) -> dict[str, Any]:
    """``attributes.vinekv`` of a parsed Zarr group ``zarr.json``, or `CorruptMetadataError`
    naming ``where``."""
    if node.get("zarr_format") != 3:
        raise CorruptMetadataError(f"{where}: zarr_format {node.get('zarr_format')!r}, expected 3")
    if node.get("node_type") != "group" or not isinstance(node.get("attributes"), dict):
        raise CorruptMetadataError(f"{where}: not a Zarr v3 group (node_type {node.get('node_type')!r})")
    attrs = node["attributes"].get("vinekv")
    if attrs is None:
        raise CorruptMetadataError(f"{where}: no attributes.vinekv")
    return attrs


def parse_json(raw: bytes, where: str) -> dict[str, Any]:
    """A JSON object from ``raw``, or `CorruptMetadataError` naming ``where``."""
    try:
        node = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptMetadataError(f"{where}: not valid JSON ({err})") from None
    except RecursionError:
        raise CorruptMetadataError(f"{where}: not valid metadata (JSON nested too deep)") from None
    if not isinstance(node, dict):
        raise CorruptMetadataError(f"{where}: JSON {type(node).__name__}, expected an object")
    return node


def prompt_content_key(
    token_ids: np.ndarray, fingerprint: str, layout: Mapping[str, Any], codec: Mapping[str, Any], codes: Any
) -> str:
    """Name of a prompt node: blake2b-80 hex of its tokens, policy, layout, codec and stored codes.

    Trajectories share a prompt node only when all of these are equal, bit for bit: two
    captures of one prompt that differ in dtype, codec or numerics get two nodes.

    Args:
      token_ids: [prompt_len] prompt tokens.
      codes: the node's stored arrays by name (numpy arrays, or objects with ``.data``).
    """
    h = hashlib.blake2b(digest_size=10)
    h.update(canonical_json({"fingerprint": fingerprint, "layout": dict(layout), "codec": dict(codec)}))
    h.update(np.ascontiguousarray(token_ids, np.int32).tobytes())
    for name in sorted(codes):
        data = np.ascontiguousarray(getattr(codes[name], "data", codes[name]))
        h.update(canonical_json([name, str(data.dtype), list(data.shape)]))
        h.update(data.view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def check_layout(layout: Any, where: str) -> KVLayout:
    """The `KVLayout` a node or the root records, or `CorruptMetadataError` naming ``where``."""
    fields = {f.name: f.type for f in dataclasses.fields(KVLayout)}
    if not isinstance(layout, dict) or set(layout) != set(fields):
        raise CorruptMetadataError(f"{where}: layout must be an object with keys {sorted(fields)}, got {layout!r}")
    for name in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
        value = layout[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**31:
            raise CorruptMetadataError(f"{where}: layout.{name} must be a positive int, got {value!r}")
    if not isinstance(layout["model_type"], str) or not isinstance(layout["keys_post_rope"], bool):
        raise CorruptMetadataError(f"{where}: layout.model_type must be a str and keys_post_rope a bool")
    try:
        np.dtype(layout["dtype"])
    except TypeError:
        raise CorruptMetadataError(f"{where}: layout.dtype {layout['dtype']!r} is not a dtype") from None
    return KVLayout.from_dict(layout)
