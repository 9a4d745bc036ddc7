"""The store's I/O: Zarr v3 nodes through TensorStore, on any TensorStore kvstore.

Keys are relative to the store root (``runs/r0/trajectories/t0/zarr.json``). Arrays are Zarr
v3 with the ``sharding_indexed`` codec: one shard (one file) per array, inner chunks of
``chunk_tokens`` tokens, each zstd-compressed and crc32c-checksummed, the shard index
checksummed too. A prefix read fetches the index and only the inner chunks it needs.

Commits: a node becomes visible when its group ``zarr.json`` appears. On a local path
everything is written under ``.staging/<id>/`` and then renamed into place in one atomic
``rename``; on other kvstores (``memory://``, object stores) the arrays are written in place
and the group ``zarr.json`` last, which readers take as the commit marker.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import uuid
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
    """

    def __init__(self, path_or_spec: str | Path | dict[str, Any]):
        self.context = ts.Context()
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
        chunk_tokens: int,
        zstd_level: int,
        attributes: dict[str, Any],
    ) -> ts.Future:
        """Starts writing ``data`` (token axis 2) as a sharded Zarr v3 array; returns the future."""
        shape = list(data.shape)
        shard = list(shape)
        shard[2] = max(chunk_tokens, math.ceil(shape[2] / chunk_tokens) * chunk_tokens)
        inner = list(shape)
        inner[2] = chunk_tokens
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
        return ts.open({**self.array_spec(path), "open": True}, context=self.context, read=True).result()

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
        src, dst = self.local_root / staging, self.local_root / final_prefix
        _write_durable(src / "zarr.json", group_json(attributes))
        _fsync_dir(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(src, dst)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{final_prefix} already exists in the store") from err
            raise
        _fsync_dir(dst.parent)

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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
