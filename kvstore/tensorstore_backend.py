"""The store's I/O: Zarr v3 nodes through TensorStore, on any TensorStore kvstore.

Keys are relative to the store root (``runs/r0/trajectories/t0/zarr.json``). Arrays are Zarr
v3 with the ``sharding_indexed`` codec: one shard (one file) per array, inner chunks of
``chunk_tokens`` tokens, each zstd-compressed and crc32c-checksummed, the shard index
checksummed too. A prefix read fetches the index and only the inner chunks it needs.

A node becomes visible when its group ``zarr.json`` appears. How that is made atomic is the
backend's commit protocol, chosen by `open_backend` from the kvstore:

- `RenameCommit` (``kvstore/commit_rename.py``, a local path): a node is written under the
  writer's staging folder and renamed into place, fsynced as asked.
- `MarkerCommit` (``kvstore/commit_marker.py``, object stores and ``memory://``): a node's
  arrays are written under a fresh attempt prefix inside it and its ``zarr.json``, naming the
  attempt, is created with a conditional write. Readers follow the marker to the attempt.

Concurrency: TensorStore compresses and checksums chunks on ``data_copy_concurrency`` threads
(default: every core) and runs file I/O on ``file_io_concurrency`` threads; decoded chunks are
kept in a cache pool of ``cache_bytes`` (shared prompt chunks are read from disk once).
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from kvstore.codecs.base import zarr_chunk_codecs
from kvstore.errors import CorruptMetadataError
from kvstore.integrity import parse_json

GC_GRACE_S = 3600.0  # unmarked attempts younger than this may be writes in flight


def group_json(attributes: dict[str, Any]) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=1).encode()


@dataclasses.dataclass(frozen=True)
class GarbageReport:
    """What `TensorStoreBackend.collect_garbage` did.

    Attributes:
      removed: locations removed (uncommitted attempts, interrupted deletions, staging leftovers).
      kept: unmarked attempts younger than the grace period, left alone (writes may be in flight).
      busy: other writers of a local store were active, so its staging area was not swept.
    """

    removed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    busy: bool = False


class TensorStoreBackend(abc.ABC):
    """Zarr v3 nodes under one root of a TensorStore kvstore: the I/O both commit protocols share.

    Args:
      spec: a TensorStore kvstore JSON spec (see `open_backend`).
      durable_writes: fsync each file as it is written (else: at `commit_group`; local paths).
      cache_bytes: decoded chunks kept in memory for reads (0: no cache).
      io_threads: TensorStore's file-I/O concurrency.
    """

    group_commit = False  # whether nodes can be staged and committed together (`commit_group`)

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

    # -- the commit protocol ---------------------------------------------------------------
    @abc.abstractmethod
    def children(self, prefix: str, skip_incomplete: bool = False) -> list[str]:
        """Names of the committed child nodes of ``prefix`` (those with a ``zarr.json``)."""

    def incomplete_children(self, prefix: str) -> list[str]:
        """Child folders of ``prefix`` that hold data but no ``zarr.json`` (none where a node is
        defined by its ``zarr.json`` alone, as with commit markers)."""
        return []

    @abc.abstractmethod
    def stored_bytes(self, prefix: str) -> int:
        """Bytes stored under ``prefix``."""

    @abc.abstractmethod
    def staging_prefix(self, final_prefix: str) -> str:
        """A fresh prefix to write the arrays of a node that will be committed at ``final_prefix``."""

    @abc.abstractmethod
    def data_path(self, staging: str, final_prefix: str) -> str:
        """Where a committed node's arrays are, relative to ``final_prefix`` (``""``: in it);
        recorded in the node's attributes as ``data`` when not empty."""

    @abc.abstractmethod
    def commit(self, staging: str, final_prefix: str, attributes: dict[str, Any], durable: bool | None = None) -> None:
        """Makes the node staged at ``staging`` visible at ``final_prefix`` with its group
        ``attributes``, atomically; `FileExistsError` (its data discarded) if a node is already
        there. ``durable`` (default: ``durable_writes``) applies where writes are fsynced."""

    @abc.abstractmethod
    def discard(self, staging: str) -> None:
        """Removes an uncommitted node's data (after a failed write)."""

    @abc.abstractmethod
    def retire(self, prefix: str) -> None:
        """Deletes a committed node: it disappears at once, whole."""

    @abc.abstractmethod
    def create_group(self, prefix: str, attributes: dict[str, Any], files: dict[str, bytes]) -> bool:
        """Creates a group at ``prefix`` holding ``files`` (key relative to ``prefix`` -> bytes),
        atomically: the group's ``zarr.json`` appears last, written by one of racing creators.
        Returns False when the group already existed."""

    @abc.abstractmethod
    def create_root(self, root: bytes, files: dict[str, bytes]) -> bool:
        """Creates a store: ``files`` (key -> bytes), then the root ``zarr.json``, which only one
        of racing creators writes. Returns False when a root already existed (the caller reads it)."""

    @abc.abstractmethod
    def update_json(self, key: str, change: Callable[[dict[str, Any] | None], bytes]) -> bytes:
        """Replaces the JSON document at ``key`` with ``change(current)`` atomically (readers see
        the old or the new value) and without lost updates between writers: ``change`` may be
        called again with a newer value when another writer updated it meanwhile. Returns what
        was written."""

    @abc.abstractmethod
    def lock_for_writing(self) -> GarbageReport:
        """Registers this writer and removes what crashed writers left (`collect_garbage` with the
        default grace period); returns what it removed."""

    @abc.abstractmethod
    def unlock(self) -> None:
        """Releases what `lock_for_writing` took."""

    @abc.abstractmethod
    def collect_garbage(self, grace_s: float = GC_GRACE_S) -> GarbageReport:
        """Removes what crashed writers and deletions left behind; never touches a committed node."""


def open_backend(
    path_or_spec: str | Path | dict[str, Any],
    *,
    durable_writes: bool = True,
    cache_bytes: int = 0,
    io_threads: int = 8,
) -> TensorStoreBackend:
    """The backend of a store location: `RenameCommit` for a local path (a path, ``file://`` URL or
    file spec), `MarkerCommit` for any other kvstore (``s3://``, ``gs://``, ``memory://``, a spec)."""
    from kvstore.commit_marker import MarkerCommit
    from kvstore.commit_rename import RenameCommit

    spec = _kvstore_spec(path_or_spec)
    protocol = RenameCommit if spec.get("driver") == "file" else MarkerCommit
    return protocol(spec, durable_writes=durable_writes, cache_bytes=cache_bytes, io_threads=io_threads)


def is_local(path_or_spec: str | Path | dict[str, Any]) -> bool:
    """Whether a store location is a local directory (a path, ``file://`` URL or file spec)."""
    return _kvstore_spec(path_or_spec).get("driver") == "file"


def _kvstore_spec(path_or_spec: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A TensorStore kvstore spec; an ``s3://`` URL gets its endpoint and region from the standard
    variables (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_REGION`` or
    ``AWS_DEFAULT_REGION``), which TensorStore itself does not read. Credentials stay with
    TensorStore (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles) and are never logged."""
    if isinstance(path_or_spec, dict):
        spec = dict(path_or_spec)
    elif isinstance(path_or_spec, Path) or "://" not in str(path_or_spec):
        spec = {"driver": "file", "path": str(Path(path_or_spec).expanduser().resolve())}
    else:
        spec = ts.KvStore.Spec(str(path_or_spec)).to_json()
        if spec.get("driver") == "s3":
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if endpoint:
                spec["endpoint"] = endpoint
            if region or endpoint:
                spec["aws_region"] = region or "us-east-1"
    if spec.get("driver") == "s3":  # commit markers are conditional creates, done by the server
        spec.setdefault("use_conditional_write", True)
    if spec.get("path") and not spec["path"].endswith("/"):
        spec["path"] += "/"
    return spec


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)
