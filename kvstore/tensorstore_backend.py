"""The store's I/O: Zarr v3 nodes through TensorStore, on any TensorStore kvstore.

Keys are relative to the store root (``runs/r0/trajectories/t0/zarr.json``). Arrays are Zarr
v3 with the ``sharding_indexed`` codec: one shard (one file) per array, inner chunks of
``chunk_tokens`` tokens, each zstd-compressed and crc32c-checksummed, the shard index
checksummed too. A prefix read fetches the index and only the inner chunks it needs.

A node becomes visible when its group ``zarr.json`` appears. How that is made atomic is the
backend's commit protocol (the contract: `vinekv.kvstore.backends.interface`), chosen by
`vinekv.kvstore.backends.factory.open_backend` from the kvstore:

- `RenameCommit` (``kvstore/backends/rename.py``, a local path): a node is written under the
  writer's staging folder and renamed into place, fsynced as asked.
- `MarkerCommit` (``kvstore/backends/marker.py``, object stores and ``memory://``): a node's
  arrays are written under a fresh attempt prefix inside it and its ``zarr.json``, naming the
  attempt, is created with a conditional write. Readers follow the marker to the attempt.

Concurrency: TensorStore compresses and checksums chunks on ``data_copy_concurrency`` threads
(default: every core) and runs file I/O on ``file_io_concurrency`` threads; decoded chunks are
kept in a cache pool of ``cache_bytes`` (shared prompt chunks are read from disk once).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
import tensorstore as ts

from vinekv.kvstore.backends.interface import Backend
from vinekv.kvstore.codecs.base import zarr_chunk_codecs
from vinekv.kvstore.errors import CorruptMetadataError
from vinekv.kvstore.integrity import parse_json


def group_json(attributes: dict[str, Any]) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=1).encode()


class TensorStoreBackend(Backend):
    """Zarr v3 nodes under one root of a TensorStore kvstore: the I/O both commit protocols share.

    Args:
      spec: a TensorStore kvstore JSON spec (see `open_backend`).
      durable_writes: fsync each file as it is written (else: at `commit_group`; local paths).
      cache_bytes: decoded chunks kept in memory for reads (0: no cache).
      io_threads: TensorStore's file-I/O concurrency.
    """

    def __init__(self, spec: dict[str, Any], *, durable_writes: bool = True, cache_bytes: int = 0, io_threads: int = 8):
        self.durable_writes = durable_writes
        self.context = ts.Context(
            ts.Context.Spec(
                {
                    "file_io_sync": durable_writes,
                    "cache_pool": {"total_bytes_limit": int(cache_bytes)},
                    "data_copy_concurrency": {"limit": os.cpu_count() or 1},
                    "file_io_concurrency": {"limit": int(io_threads)},
                }
            )
        )
        self.kvstore = ts.KvStore.open(spec, context=self.context).result()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"

    @property
    def description(self) -> str:
        return json.dumps(self.kvstore.spec().to_json())

    def location(self, key: str) -> str:
        """Where ``key`` is, for error messages: the kvstore URL and key."""
        return self.kvstore.url + key

    # -- plain keys ------------------------------------------------------------------------
    def read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object at ``key`` (None if absent); `CorruptMetadataError` naming the file if
        it is not a JSON object."""
        return self._read_versioned(key)[0]

    def _read_versioned(self, key: str) -> tuple[dict[str, Any] | None, bytes]:
        """(`read_json`, the storage generation read: the condition of a compare-and-swap)."""
        try:
            result = self.kvstore.read(key).result()
        except ValueError as err:
            raise CorruptMetadataError(f"{self.location(key)}: unreadable ({err})") from None
        document = parse_json(result.value, self.location(key)) if result.state == "value" else None
        return document, result.stamp.generation

    def write_bytes(self, key: str, value: bytes) -> None:
        self.kvstore.write(key, value).result()

    def exists(self, key: str) -> bool:
        return self.kvstore.read(key).result().state == "value"

    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, relative to the root."""
        return sorted(k.decode() for k in self.kvstore.list(ts.KvStore.KeyRange(prefix, _prefix_end(prefix))).result())

    def delete_prefix(self, prefix: str) -> None:
        """Removes everything under ``prefix`` (not atomic: for uncommitted data and leftovers)."""
        self.kvstore.delete_range(ts.KvStore.KeyRange(prefix, _prefix_end(prefix))).result()

    # -- arrays ----------------------------------------------------------------------------
    def array_spec(self, path: str) -> dict[str, Any]:
        return {"driver": "zarr3", "kvstore": (self.kvstore / (path + "/")).spec().to_json()}

    def write_array(
        self,
        path: str,
        data: np.ndarray,
        dims: tuple[str, ...],
        chunk_entries: int,
        zstd_level: int,
        attributes: dict[str, Any],
    ) -> ts.Future:
        """Starts writing ``data`` as a sharded Zarr v3 array at a fresh ``path`` (a staging or
        attempt prefix), inner chunks of ``chunk_entries`` along axis 2 (the token axis);
        returns the future."""
        shape = list(data.shape)
        shard = list(shape)
        shard[2] = max(chunk_entries, math.ceil(shape[2] / chunk_entries) * chunk_entries)
        inner = list(shape)
        inner[2] = chunk_entries
        metadata = {
            "shape": shape,
            "data_type": str(data.dtype),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": inner,
                        "codecs": zarr_chunk_codecs(zstd_level),
                        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                        "index_location": "end",
                    },
                }
            ],
            "dimension_names": list(dims),
            "attributes": attributes,
        }
        # Every chunk is stored, also one equal to the fill value: readers refuse missing chunks.
        spec = {
            **self.array_spec(path),
            "metadata": metadata,
            "create": True,
            "store_data_equal_to_fill_value": True,
            "context": {"cache_pool": {"total_bytes_limit": 0}},  # written chunks are not kept for reads
        }
        array = ts.open(spec, context=self.context).result()
        return array.write(data)

    def open_array(self, path: str, metadata: dict[str, Any] | None = None) -> ts.TensorStore:
        """Opens a committed array for reading.

        With ``metadata`` (the array's ``zarr.json``, already verified by the caller) the stored
        metadata is not read again, and a missing chunk or shard file is an error instead of
        reading as the fill value. Cached chunks are revalidated when an array is opened (a run
        deleted and written again under the same names is not served from the cache), not on
        every read of an open handle (a committed node never changes).
        """
        spec = {**self.array_spec(path), "open": True, "recheck_cached_data": "open"}
        if metadata is None:
            spec["recheck_cached_metadata"] = "open"
        else:
            spec.update(metadata=metadata, assume_metadata=True, fill_missing_data_reads=False)
        return ts.open(spec, context=self.context, read=True).result()

    def folders(self, prefix: str) -> list[str]:
        return sorted({key[len(prefix) :].split("/")[0] for key in self.keys(prefix) if "/" in key[len(prefix) :]})


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
