"""The store's I/O: Zarr v3 nodes through TensorStore, on any TensorStore kvstore.

Keys are relative to the store root (``runs/r0/trajectories/t0/zarr.json``). Arrays are Zarr
v3 with the ``sharding_indexed`` codec: one shard (one file) per array, inner chunks of
``chunk_tokens`` tokens, each zstd-compressed and crc32c-checksummed, the shard index
checksummed too. A prefix read fetches the index and only the inner chunks it needs.

Commits: a node becomes visible when its group ``zarr.json`` appears. On a local path
everything is written under ``.staging/<id>/`` and then renamed into place in one atomic
``rename``; on other kvstores (``memory://``, object stores) the arrays are written in place
and the group ``zarr.json`` last, which readers take as the commit marker.

Durability on a local path: ``durable_writes=True`` fsyncs every file as TensorStore writes it
and each node's directories at its commit; with ``False`` nothing is fsynced until
`commit_group`, which fsyncs every staged node's files in one parallel round, renames the
nodes into place and fsyncs their parent directories once (group commit).

Concurrency: TensorStore compresses and checksums chunks on ``data_copy_concurrency`` threads
(default: every core) and runs file I/O on ``file_io_concurrency`` threads; decoded chunks are
kept in a cache pool of ``cache_bytes`` (shared prompt chunks are read from disk once).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from kvstore.codecs.base import zarr_chunk_codecs

STAGING = ".staging"


def group_json(attributes: dict[str, Any]) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attributes}, indent=1).encode()


class TensorStoreBackend:
    """Zarr v3 nodes under one root of a TensorStore kvstore.

    Args:
      path_or_spec: a local path, a kvstore URL (``memory://name/``, ``file:///abs/``), or a
        kvstore JSON spec.
      durable_writes: fsync each file as it is written (else: at `commit_group`).
      cache_bytes: decoded chunks kept in memory for reads (0: no cache).
      io_threads: TensorStore's file-I/O concurrency.
    """

    def __init__(
        self,
        path_or_spec: str | Path | dict[str, Any],
        *,
        durable_writes: bool = True,
        cache_bytes: int = 0,
        io_threads: int = 8,
    ):
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
        spec = _kvstore_spec(path_or_spec)
        self.kvstore = ts.KvStore.open(spec, context=self.context).result()
        self.local_root = Path(spec["path"]) if spec.get("driver") == "file" else None
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"TensorStoreBackend({self.kvstore.spec().to_json()})"

    @property
    def description(self) -> str:
        return str(self.local_root) if self.local_root else json.dumps(self.kvstore.spec().to_json())

    # -- plain keys ------------------------------------------------------------------------
    def read_json(self, key: str) -> dict[str, Any] | None:
        result = self.kvstore.read(key).result()
        return json.loads(result.value) if result.state == "value" else None

    def write_bytes(self, key: str, value: bytes) -> None:
        self.kvstore.write(key, value).result()

    def exists(self, key: str) -> bool:
        return self.kvstore.read(key).result().state == "value"

    def children(self, prefix: str) -> list[str]:
        """Names of the committed child groups of ``prefix`` (those with a ``zarr.json``)."""
        if self.local_root is not None:
            folder = self.local_root / prefix
            if not folder.is_dir():
                return []
            return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file())
        keys = self.kvstore.list(ts.KvStore.KeyRange(prefix, _prefix_end(prefix))).result()
        names = set()
        for key in keys:
            rest = key.decode()[len(prefix) :].split("/")
            if len(rest) == 2 and rest[1] == "zarr.json":
                names.add(rest[0])
        return sorted(names)

    def delete_prefix(self, prefix: str) -> None:
        if self.local_root is not None:
            shutil.rmtree(self.local_root / prefix, ignore_errors=True)
            return
        self.kvstore.delete_range(ts.KvStore.KeyRange(prefix, _prefix_end(prefix))).result()

    def stored_bytes(self, prefix: str) -> int:
        """Bytes stored under ``prefix`` (files on disk, or values in other kvstores)."""
        if self.local_root is not None:
            return sum(f.stat().st_size for f in (self.local_root / prefix).rglob("*") if f.is_file())
        keys = self.kvstore.list(ts.KvStore.KeyRange(prefix, _prefix_end(prefix))).result()
        return sum(len(self.kvstore.read(k.decode()).result().value) for k in keys)

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
        """Starts writing ``data`` as a sharded Zarr v3 array, inner chunks of ``chunk_entries``
        along axis 2 (the token axis); returns the future."""
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
        # Staging folders are fresh; in-place writes (other kvstores) replace a crashed attempt's data.
        spec = {
            **self.array_spec(path),
            "metadata": metadata,
            "create": True,
            "delete_existing": self.local_root is None,
        }
        array = ts.open(spec, context=self.context).result()
        return array.write(data)

    def open_array(self, path: str) -> ts.TensorStore:
        """Opens a committed array for reading. Cached chunks are revalidated when an array is
        opened (a run deleted and written again under the same names is not served from the
        cache), not on every read of an open handle (a committed node never changes)."""
        spec = {**self.array_spec(path), "open": True, "recheck_cached_data": "open", "recheck_cached_metadata": "open"}
        return ts.open(spec, context=self.context, read=True).result()

    # -- commits ---------------------------------------------------------------------------
    def staging_prefix(self, final_prefix: str) -> str:
        """Where to write a node that will be committed at ``final_prefix``."""
        if self.local_root is None:
            return final_prefix
        return f"{STAGING}/{uuid.uuid4().hex}/"

    def commit(self, staging: str, final_prefix: str, attributes: dict[str, Any]) -> None:
        """Writes the group ``zarr.json`` and makes the node visible at ``final_prefix``."""
        if self.local_root is None:
            self.write_bytes(final_prefix + "zarr.json", group_json(attributes))
            return
        self.stage(staging, attributes)
        if self.durable_writes:
            _fsync_path(self.local_root / staging)
        self._rename(staging, final_prefix)
        if self.durable_writes:
            _fsync_path((self.local_root / final_prefix).parent)

    def stage(self, staging: str, attributes: dict[str, Any]) -> None:
        """Writes a staged node's group ``zarr.json`` (fsynced only with ``durable_writes``)."""
        if self.local_root is None:
            raise NotImplementedError("staged commits need a local store")
        (self.local_root / staging).mkdir(parents=True, exist_ok=True)  # a node without arrays
        _write_file(self.local_root / staging / "zarr.json", group_json(attributes), self.durable_writes)

    def commit_group(self, nodes: list[tuple[str, str, str | None]]) -> list[tuple[str, BaseException]]:
        """Commits staged ``(staging, final_prefix, requires)`` nodes, in order, with one round of
        fsyncs.

        Every file and directory of every staged node is fsynced (in parallel), then each node is
        renamed into place and the parent directories are fsynced once. A node whose ``requires``
        (the final prefix of a node it references, earlier in ``nodes`` or already committed) did
        not commit is not committed either. Every node not committed has its staging data
        discarded. Returns ``(final_prefix, error)`` of those nodes; if the fsync round itself
        fails, nothing is committed and the error is raised.
        """
        if self.local_root is None or not nodes:
            return []
        root = self.local_root
        try:
            entries = [p for staging, _, _ in nodes for p in (root / staging).rglob("*")]
            dirs = [root / staging for staging, _, _ in nodes] + [p for p in entries if p.is_dir()]
            with ThreadPoolExecutor(max_workers=16) as pool:  # fsync releases the GIL: one parallel round
                list(pool.map(_fsync_path, [p for p in entries if p.is_file()]))
                list(pool.map(_fsync_path, dirs))
        except BaseException:
            for staging, _, _ in nodes:
                self.discard(staging)
            raise
        failed: list[tuple[str, BaseException]] = []
        parents = set()
        for staging, final, requires in nodes:
            missing = requires is not None and not (root / requires / "zarr.json").is_file()
            try:
                if missing:
                    raise FileNotFoundError(f"{requires} (which {final} references) was not committed")
                self._rename(staging, final)
                parents.add((root / final).parent)
            except OSError as err:
                self.discard(staging)
                failed.append((final, err))
        for parent in sorted(parents):
            _fsync_path(parent)
        return failed

    def write_durable(self, key: str, value: bytes) -> None:
        """`write_bytes`, and on a local disk also fsynced with every folder above it (for the
        few metadata files a store or run is created with)."""
        if self.local_root is None:
            self.write_bytes(key, value)
            return
        path = self.local_root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_durable(path, value)
        for folder in [path.parent, *path.parent.parents]:
            _fsync_path(folder)
            if folder == self.local_root:
                break

    def _rename(self, staging: str, final_prefix: str) -> None:
        src, dst = self.local_root / staging, self.local_root / final_prefix
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dst)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{final_prefix} already exists in the store") from err
            raise

    def discard(self, staging: str) -> None:
        """Removes an uncommitted node's data (after a failed write)."""
        self.delete_prefix(staging)

    def lock_for_writing(self) -> None:
        """One writer per local store: takes an exclusive lock and clears stale staging data."""
        if self.local_root is None:
            return
        staging = self.local_root / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        if not (staging / "zarr.json").exists():
            _write_durable(
                staging / "zarr.json",
                group_json({"vinekv": "temporary area for writes in flight; never holds committed data"}),
            )
        fd = os.open(staging / "zarr.json", os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            os.close(fd)
            raise RuntimeError(f"store {self.local_root} is open for writing by another process") from err
        self._lock_fd = fd
        for leftover in staging.iterdir():
            if leftover.is_dir():  # a crashed writer's uncommitted data
                shutil.rmtree(leftover, ignore_errors=True)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def is_local(path_or_spec: str | Path | dict[str, Any]) -> bool:
    """Whether a store location is a local directory (a path, ``file://`` URL or file spec)."""
    return _kvstore_spec(path_or_spec).get("driver") == "file"


def _kvstore_spec(path_or_spec: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(path_or_spec, dict):
        spec = dict(path_or_spec)
    elif isinstance(path_or_spec, Path) or "://" not in str(path_or_spec):
        spec = {"driver": "file", "path": str(Path(path_or_spec).expanduser().resolve())}
    else:
        spec = ts.KvStore.Spec(str(path_or_spec)).to_json()
    if spec.get("path") and not spec["path"].endswith("/"):
        spec["path"] += "/"
    return spec


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _write_durable(path: Path, data: bytes) -> None:
    _write_file(path, data, durable=True)


def _write_file(path: Path, data: bytes, durable: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_path(path: Path) -> None:
    """fsync of a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
