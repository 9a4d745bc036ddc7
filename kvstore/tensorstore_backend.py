"""The store's I/O: Zarr v3 nodes through TensorStore, on any TensorStore kvstore.

Keys are relative to the store root (``runs/r0/trajectories/t0/zarr.json``). Arrays are Zarr
v3 with the ``sharding_indexed`` codec: one shard (one file) per array, inner chunks of
``chunk_tokens`` tokens, each zstd-compressed and crc32c-checksummed, the shard index
checksummed too. A prefix read fetches the index and only the inner chunks it needs.

Commits: a node becomes visible when its group ``zarr.json`` appears. On a local path
everything is written under ``.staging/<session>/<id>/`` and then renamed into place in one
atomic ``rename``; on other kvstores (``memory://``, object stores) the arrays are written in
place and the group ``zarr.json`` last, which readers take as the commit marker. Deleting a
node renames it into staging first, so it disappears at once and whole.

Writers on a local path share a lock (``.staging/zarr.json``); each writes under its own
session folder, and leftovers of crashed writers are swept by the first writer that finds no
other writer holding the lock. Read-modify-write of metadata (`meta_lock`) is serialised
across processes by an exclusive lock on ``.staging/meta.lock``.

Durability on a local path: ``durable_writes=True`` fsyncs every file as TensorStore writes it
and each node's directories at its commit; with ``False`` nothing is fsynced until
`commit_group`, which fsyncs every staged node's files in one parallel round, renames the
nodes into place and fsyncs their parent directories once (group commit).

Concurrency: TensorStore compresses and checksums chunks on ``data_copy_concurrency`` threads
(default: every core) and runs file I/O on ``file_io_concurrency`` threads; decoded chunks are
kept in a cache pool of ``cache_bytes`` (shared prompt chunks are read from disk once).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import tensorstore as ts

from kvstore.codecs.base import zarr_chunk_codecs
from kvstore.errors import CorruptMetadataError, StoreError
from kvstore.integrity import parse_json

STAGING = ".staging"
OBJECT_STORES = ("s3", "gcs")
OBJECT_STORE_TIMEOUT_S = 30.0  # the opening probe of an object store


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
        self._session = uuid.uuid4().hex[:12]
        if spec.get("driver") in OBJECT_STORES:
            self._probe(spec)

    def __repr__(self) -> str:
        return f"TensorStoreBackend({self.kvstore.spec().to_json()})"

    @property
    def description(self) -> str:
        return str(self.local_root) if self.local_root else json.dumps(self.kvstore.spec().to_json())

    def _probe(self, spec: dict[str, Any]) -> None:
        """One listing request, so a wrong endpoint or bucket is a clear error now (TensorStore
        retries an unreachable endpoint without end) rather than a hang or a failed write later."""
        where = f"{spec['driver']}://{spec['bucket']}/{spec.get('path', '')}"
        endpoint = spec.get("endpoint", "the provider's default endpoint")
        try:
            self.kvstore.list(ts.KvStore.KeyRange("zarr.json", "zarr.json\0")).result(timeout=OBJECT_STORE_TIMEOUT_S)
        except TimeoutError:
            raise StoreError(
                f"{where}: no answer from {endpoint} within {OBJECT_STORE_TIMEOUT_S} s; set the endpoint "
                "(AWS_ENDPOINT_URL, or 'endpoint' in a kvstore spec) and check the network"
            ) from None
        except ValueError as err:
            if "NoSuchBucket" in str(err):
                raise StoreError(f"{where}: bucket {spec['bucket']!r} does not exist at {endpoint}") from None
            raise StoreError(f"{where}: the object store refused a listing: {str(err)[:300]}") from None

    def location(self, key: str) -> str:
        """Where ``key`` is, for error messages: a file path, or the kvstore URL and key."""
        if self.local_root is None:
            spec = self.kvstore.spec().to_json()
            if spec.get("driver") in ("s3", "gcs"):  # ts cannot print an s3 URL with an explicit endpoint
                return f"{spec['driver']}://{spec['bucket']}/{spec.get('path', '')}{key}"
            return self.kvstore.url + key
        return str(self.local_root / key) + ("/" if key.endswith("/") else "")

    # -- plain keys ------------------------------------------------------------------------
    def read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object at ``key`` (None if absent); `CorruptMetadataError` naming the file if
        it is not a JSON object."""
        try:
            result = self.kvstore.read(key).result()
        except ValueError as err:
            raise CorruptMetadataError(f"{self.location(key)}: unreadable ({err})") from None
        return parse_json(result.value, self.location(key)) if result.state == "value" else None

    def write_bytes(self, key: str, value: bytes) -> None:
        self.kvstore.write(key, value).result()

    def replace_bytes(self, key: str, value: bytes, durable: bool | None = None) -> None:
        """Replaces an existing key atomically (readers see the old or the new value); ``durable``
        (default ``durable_writes``) fsyncs it. On a local path the new value is written under
        this writer's staging folder and renamed over the file, so a writer killed mid-write
        leaves nothing beside it (the staging sweep removes it)."""
        if self._lock_fd is None:
            self.write_bytes(key, value)
            return
        durable = self.durable_writes if durable is None else durable
        tmp = self.local_root / self.staging_prefix(key).rstrip("/")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        _write_new_file(tmp, value, durable)
        os.replace(tmp, self.local_root / key)
        if durable:
            _fsync_path((self.local_root / key).parent)

    def exists(self, key: str) -> bool:
        return self.kvstore.read(key).result().state == "value"

    def children(self, prefix: str) -> list[str]:
        """Names of the committed child groups of ``prefix`` (those with a ``zarr.json``).

        On a local path, a child folder without ``zarr.json`` cannot come from a commit (nodes
        appear by rename, whole) and raises `CorruptMetadataError` naming it.
        """
        if self.local_root is not None:
            folder = self.local_root / prefix
            if not folder.is_dir():
                return []
            names = []
            for p in folder.iterdir():
                if (p / "zarr.json").is_file():
                    names.append(p.name)
                elif p.is_dir():
                    raise CorruptMetadataError(f"{p}/zarr.json is missing: the node's metadata was deleted")
            return sorted(names)
        keys = self.kvstore.list(ts.KvStore.KeyRange(prefix, _prefix_end(prefix))).result()
        names = set()
        for key in keys:
            rest = key.decode()[len(prefix) :].split("/")
            if len(rest) == 2 and rest[1] == "zarr.json":
                names.add(rest[0])
        return sorted(names)

    def delete_prefix(self, prefix: str) -> None:
        """Removes everything under ``prefix`` (not atomic: for staging data and other kvstores)."""
        if self.local_root is not None:
            shutil.rmtree(self.local_root / prefix, ignore_errors=True)
            return
        self.kvstore.delete_range(ts.KvStore.KeyRange(prefix, _prefix_end(prefix))).result()

    def retire(self, prefix: str) -> None:
        """Deletes a committed node atomically: on a local path it is renamed into this session's
        staging folder (gone from its place at once and whole, swept if a crash interrupts the
        removal), then removed; elsewhere its ``zarr.json`` goes first, then the rest."""
        if self.local_root is None:
            marker = prefix + "zarr.json"
            self.kvstore.delete_range(ts.KvStore.KeyRange(marker, marker + "\0")).result()
            self.delete_prefix(prefix)
            return
        graveyard = self.staging_prefix(prefix)
        (self.local_root / graveyard).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.local_root / prefix, self.local_root / graveyard)
        _fsync_path((self.local_root / prefix).parent)
        self.delete_prefix(graveyard)

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
        # Every chunk is stored, also one equal to the fill value: readers refuse missing chunks.
        spec = {
            **self.array_spec(path),
            "metadata": metadata,
            "create": True,
            "delete_existing": self.local_root is None,
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

    # -- commits ---------------------------------------------------------------------------
    def staging_prefix(self, final_prefix: str) -> str:
        """Where to write a node that will be committed at ``final_prefix`` (this session's own
        staging folder on a local path)."""
        if self.local_root is None:
            return final_prefix
        return f"{STAGING}/{self._session}/{uuid.uuid4().hex}/"

    def commit(self, staging: str, final_prefix: str, attributes: dict[str, Any], durable: bool | None = None) -> None:
        """Writes the group ``zarr.json`` and makes the node visible at ``final_prefix``;
        ``durable`` (default: ``durable_writes``) fsyncs the node and its new directory entry.
        `FileExistsError` if a node is already there."""
        if self.local_root is None:
            self.write_bytes(final_prefix + "zarr.json", group_json(attributes))
            return
        durable = self.durable_writes if durable is None else durable
        self.stage(staging, attributes, durable)
        if durable and not self.durable_writes:  # TensorStore did not fsync the node's files
            for path in sorted((self.local_root / staging).rglob("*"), reverse=True):
                _fsync_path(path)
        if durable:
            _fsync_path(self.local_root / staging)
        self._rename(staging, final_prefix)
        if durable:
            _fsync_path((self.local_root / final_prefix).parent)

    def stage(self, staging: str, attributes: dict[str, Any], durable: bool | None = None) -> None:
        """Writes a staged node's group ``zarr.json``, fsynced when ``durable`` (default:
        ``durable_writes``)."""
        if self.local_root is None:
            raise NotImplementedError("staged commits need a local store")
        (self.local_root / staging).mkdir(parents=True, exist_ok=True)  # a node without arrays
        durable = self.durable_writes if durable is None else durable
        _write_file(self.local_root / staging / "zarr.json", group_json(attributes), durable)

    def commit_group(
        self, nodes: list[tuple[str, str, str | None]], shared: frozenset[str] = frozenset()
    ) -> list[tuple[str, BaseException]]:
        """Commits staged ``(staging, final_prefix, requires)`` nodes, in order, with one round of
        fsyncs. A node in ``shared`` (content-addressed) that another writer committed first
        counts as committed.

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
            except FileExistsError as err:
                self.discard(staging)
                if final not in shared:
                    failed.append((final, err))
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

    def create_root(self, root: bytes, files: dict[str, bytes]) -> bool:
        """Creates a store: writes ``files`` (key -> bytes) and then the root ``zarr.json`` as the
        commit marker, which only one of racing creators writes (an exclusive link on a local
        path). Returns False when a root already existed (the caller reads it)."""
        try:
            for key, value in files.items():
                self.write_durable(key, value)
            return self._link_root(root)
        except FileNotFoundError:  # a racing creator that won swept this one's temporary files
            if self.exists("zarr.json"):
                return False
            raise

    def _link_root(self, root: bytes) -> bool:
        if self.local_root is None:
            if self.exists("zarr.json"):
                return False
            self.write_bytes("zarr.json", root)
            return True
        path = self.local_root / "zarr.json"
        tmp = path.with_name(f"zarr.json.{uuid.uuid4().hex}.tmp")
        _write_new_file(tmp, root)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
        _fsync_path(self.local_root)
        for folder in (self.local_root, self.local_root / "runs"):
            for leftover in folder.glob("zarr.json.*.tmp"):  # an interrupted creation's temporary files
                leftover.unlink(missing_ok=True)
        return True

    def lock_for_writing(self) -> None:
        """Registers a writer of a local store (a shared lock) and, when no other writer holds
        it, clears crashed writers' staging data and deletions."""
        if self.local_root is None:
            return
        staging = self.local_root / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        lock = staging / "zarr.json"
        content = group_json({"vinekv": "temporary area for writes in flight; never holds committed data"})
        with contextlib.suppress(FileExistsError):  # created in place: racing writers lock one inode
            _write_new_file(lock, content)
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # other writers are active: their staging folders are theirs
        else:
            for leftover in staging.iterdir():
                if leftover.is_dir():  # a crashed writer's uncommitted data or interrupted deletion
                    shutil.rmtree(leftover, ignore_errors=True)
                elif leftover.name.endswith(".tmp"):
                    leftover.unlink(missing_ok=True)
            if lock.read_bytes() != content:  # a writer killed while creating it: rewrite the same inode
                with open(lock, "r+b") as fh:
                    fh.truncate(0)
                    fh.write(content)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._lock_fd = fd

    @contextlib.contextmanager
    def meta_lock(self) -> Iterator[None]:
        """Serialises a read-modify-write of metadata across the local store's writers."""
        if self.local_root is None:
            yield
            return
        fd = os.open(self.local_root / STAGING / "meta.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def unlock(self) -> None:
        """Removes this session's staging folder and releases the writer lock."""
        if self._lock_fd is not None:
            shutil.rmtree(self.local_root / STAGING / self._session, ignore_errors=True)
            os.close(self._lock_fd)
            self._lock_fd = None


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
    if spec.get("path") and not spec["path"].endswith("/"):
        spec["path"] += "/"
    return spec


def _prefix_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _write_durable(path: Path, data: bytes) -> None:
    _write_file(path, data, durable=True)


def _write_file(path: Path, data: bytes, durable: bool) -> None:
    """Replaces ``path`` atomically through a temporary file of its own (racing writers never
    share one)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        _write_new_file(tmp, data, durable)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_new_file(path: Path, data: bytes, durable: bool = True) -> None:
    """Creates ``path`` holding ``data``, fsynced when ``durable``; `FileExistsError` if it exists."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())


def _fsync_path(path: Path) -> None:
    """fsync of a file or a directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
