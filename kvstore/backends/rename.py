"""`RenameCommit`: the commit protocol of a store on a local disk.

Every node is written under ``.staging/<session>/<id>/`` and renamed into place in one atomic
``rename``; deleting a node renames it into staging first, so it disappears at once and whole.

Writers share a lock (``.staging/zarr.json``); each writes under its own session folder, and
leftovers of crashed writers are swept by the first writer that finds no other writer holding
the lock. Read-modify-write of metadata (`update_json`) is serialised across processes by an
exclusive lock on ``.staging/meta.lock``.

Durability: ``durable_writes=True`` fsyncs every file as TensorStore writes it and each node's
directories at its commit; with ``False`` nothing is fsynced until `commit_group`, which fsyncs
every staged node's files in one parallel round, renames the nodes into place and fsyncs their
parent directories once (group commit).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vinekv.kvstore.backends.interface import GC_GRACE_S, GarbageReport, GarbageScope, GroupCommit
from vinekv.kvstore.errors import CorruptMetadataError, MissingEntryError
from vinekv.kvstore.tensorstore_backend import TensorStoreBackend, group_json

STAGING = ".staging"


class RenameCommit(TensorStoreBackend, GroupCommit):
    """A store in a local directory: staged writes, fsync, one rename per commit, group commit."""

    def __init__(self, spec: dict[str, Any], **options: Any):
        super().__init__(spec, **options)
        self.local_root = Path(spec["path"])
        self._lock_fd: int | None = None
        self._session = uuid.uuid4().hex[:12]

    @property
    def description(self) -> str:
        return str(self.local_root)

    @property
    def local(self) -> bool:
        return True

    def location(self, key: str) -> str:
        return str(self.local_root / key) + ("/" if key.endswith("/") else "")

    def children(self, prefix: str, skip_incomplete: bool = False) -> list[str]:
        """Committed child nodes; a child folder without ``zarr.json`` cannot come from a commit
        (nodes appear by rename, whole) and raises `CorruptMetadataError` naming it, unless
        ``skip_incomplete`` (`incomplete_children` lists those)."""
        names = []
        for p in self._child_folders(prefix):
            if (p / "zarr.json").is_file():
                names.append(p.name)
            elif not skip_incomplete:
                raise CorruptMetadataError(f"{p}/zarr.json is missing: the node's metadata was deleted")
        return sorted(names)

    def incomplete_children(self, prefix: str) -> list[str]:
        """Child folders of ``prefix`` without ``zarr.json``."""
        return sorted(p.name for p in self._child_folders(prefix) if not (p / "zarr.json").is_file())

    def folders(self, prefix: str) -> list[str]:
        return sorted(p.name for p in self._child_folders(prefix))

    def _child_folders(self, prefix: str) -> list[Path]:
        folder = self.local_root / prefix
        return [p for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []

    def stored_bytes(self, prefix: str) -> int:
        return sum(f.stat().st_size for f in (self.local_root / prefix).rglob("*") if f.is_file())

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.local_root / prefix, ignore_errors=True)

    # -- commits ---------------------------------------------------------------------------
    def staging_prefix(self, final_prefix: str) -> str:
        return f"{STAGING}/{self._session}/{uuid.uuid4().hex}/"

    def data_path(self, staging: str, final_prefix: str) -> str:
        return ""  # the node's folder is renamed into place, arrays and all

    def commit(self, staging: str, final_prefix: str, attributes: dict[str, Any], durable: bool | None = None) -> None:
        durable = self.durable_writes if durable is None else durable
        self.stage(staging, attributes, durable)
        if durable and not self.durable_writes:  # TensorStore did not fsync the node's files
            for path in sorted((self.local_root / staging).rglob("*"), reverse=True):
                _fsync_path(path)
        if durable:
            _fsync_path(self.local_root / staging)
        try:
            self._rename(staging, final_prefix)
        except FileExistsError:
            self.discard(staging)
            raise
        if durable:
            self._fsync_parent(final_prefix)

    def stage(self, staging: str, attributes: dict[str, Any], durable: bool | None = None) -> None:
        """Writes a staged node's group ``zarr.json``, fsynced when ``durable`` (default:
        ``durable_writes``)."""
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
        if not nodes:
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
        parents: dict[str, list[str]] = {}  # parent folder -> the nodes renamed into it
        for staging, final, requires in nodes:
            missing = requires is not None and not (root / requires / "zarr.json").is_file()
            try:
                if missing:
                    raise FileNotFoundError(f"{requires} (which {final} references) was not committed")
                self._rename(staging, final)
                parents.setdefault(str(Path(final).parent), []).append(final)
            except FileExistsError as err:
                self.discard(staging)
                if final not in shared:
                    failed.append((final, err))
            except (OSError, MissingEntryError) as err:
                self.discard(staging)
                failed.append((final, err))
        for finals in parents.values():
            try:
                self._fsync_parent(finals[0])
            except MissingEntryError as err:
                failed += [(final, err) for final in finals]
        return failed

    def _fsync_parent(self, final_prefix: str) -> None:
        """fsync of the folder a node was renamed into; `MissingEntryError` if another writer
        deleted it (the node's run) since the rename: the node went with it."""
        parent = (self.local_root / final_prefix).parent
        try:
            _fsync_path(parent)
        except FileNotFoundError as err:
            raise MissingEntryError(
                f"{parent} is not in the store (deleted just after {final_prefix} was committed)"
            ) from err

    def _rename(self, staging: str, final_prefix: str) -> None:
        """Renames the staged node into place. Its parent group must exist: creating it here would
        resurrect, without its metadata, a run that another writer deleted meanwhile."""
        src, dst = self.local_root / staging, self.local_root / final_prefix
        try:
            os.rename(src, dst)
        except OSError as err:
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise FileExistsError(f"{final_prefix} already exists in the store") from err
            if err.errno == errno.ENOENT and src.is_dir():
                raise MissingEntryError(
                    f"{dst.parent} is not in the store (deleted while {final_prefix} was written)"
                ) from err
            raise

    def discard(self, staging: str) -> None:
        self.delete_prefix(staging)

    def retire(self, prefix: str) -> None:
        """Renames the node into this session's staging folder (gone from its place at once and
        whole, swept if a crash interrupts the removal), then removes it."""
        graveyard = self.staging_prefix(prefix)
        (self.local_root / graveyard).parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.local_root / prefix, self.local_root / graveyard)
        _fsync_path((self.local_root / prefix).parent)
        self.delete_prefix(graveyard)

    def create_group(self, prefix: str, attributes: dict[str, Any], files: dict[str, bytes]) -> bool:
        """Stages the group whole, then renames it into place, fsynced."""
        staging = self.staging_prefix(prefix)
        try:
            for key, value in files.items():
                self.write_bytes(staging + key, value)
            self.commit(staging, prefix, attributes, durable=True)
        except FileExistsError:  # another writer created it first
            return False
        return True

    def create_root(self, root: bytes, files: dict[str, bytes]) -> bool:
        """Writes ``files`` fsynced, then links the root ``zarr.json`` exclusively."""
        try:
            for key, value in files.items():
                self._write_durable(key, value)
            return self._link_root(root, {str(Path(key).parent) for key in files})
        except FileNotFoundError:  # a racing creator that won swept this one's temporary files
            if self.exists("zarr.json"):
                return False
            raise

    def _write_durable(self, key: str, value: bytes) -> None:
        """Writes ``key`` fsynced, with every folder above it up to the root."""
        path = self.local_root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(path, value, durable=True)
        for folder in [path.parent, *path.parent.parents]:
            _fsync_path(folder)
            if folder == self.local_root:
                break

    def _link_root(self, root: bytes, folders: set[str]) -> bool:
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
        for folder in folders | {"."}:
            for leftover in (self.local_root / folder).glob("zarr.json.*.tmp"):  # an interrupted creation's
                leftover.unlink(missing_ok=True)
        return True

    def update_json(
        self, key: str, change: Callable[[dict[str, Any] | None], bytes], durable: bool | None = None
    ) -> bytes:
        """Under the exclusive metadata lock: reads, changes and replaces the file, through a
        staged temporary file (a writer killed mid-write leaves nothing beside it);
        ``durable`` (default ``durable_writes``) fsyncs it."""
        with self._meta_lock():
            value = change(self.read_json(key))
            durable = self.durable_writes if durable is None else durable
            tmp = self.local_root / self.staging_prefix(key).rstrip("/")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            _write_new_file(tmp, value, durable)
            os.replace(tmp, self.local_root / key)
            if durable:
                _fsync_path((self.local_root / key).parent)
        return value

    @contextlib.contextmanager
    def _meta_lock(self) -> Iterator[None]:
        (self.local_root / STAGING).mkdir(exist_ok=True)
        fd = os.open(self.local_root / STAGING / "meta.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- writers -----------------------------------------------------------------------------
    def lock_for_writing(self, scope: GarbageScope) -> GarbageReport:
        """Takes a shared lock on ``.staging/zarr.json`` (other writers take it too) after
        sweeping the staging area if no other writer holds it."""
        fd = self._open_lock()
        report = self._sweep_if_alone(fd, scope)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._lock_fd = fd
        return report

    def unlock(self) -> None:
        """Removes this session's staging folder and releases the writer lock."""
        if self._lock_fd is not None:
            shutil.rmtree(self.local_root / STAGING / self._session, ignore_errors=True)
            os.close(self._lock_fd)
            self._lock_fd = None

    def collect_garbage(self, scope: GarbageScope, grace_s: float = GC_GRACE_S) -> GarbageReport:
        """Sweeps the staging area when no other writer holds the lock (``busy`` otherwise); the
        lock, not an age, tells a crashed writer's data from a live one's, so ``grace_s`` is
        not used. A writer of this store (which swept when it took its lock) sweeps nothing
        more: turning its shared lock into an exclusive one would drop it for a moment, and
        another writer opening then could sweep this one's staging folder."""
        if self._lock_fd is not None:
            return GarbageReport()
        fd = self._open_lock()
        try:
            return self._sweep_if_alone(fd, scope)
        finally:
            os.close(fd)

    def _open_lock(self) -> int:
        staging = self.local_root / STAGING
        staging.mkdir(parents=True, exist_ok=True)
        lock = staging / "zarr.json"
        with contextlib.suppress(FileExistsError):  # created in place: racing writers lock one inode
            _write_new_file(lock, _LOCK_CONTENT)
        return os.open(lock, os.O_RDONLY)

    def _sweep_if_alone(self, fd: int, scope: GarbageScope) -> GarbageReport:
        """Clears crashed writers' staging data and deletions when the exclusive lock is free."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return GarbageReport(busy=True)  # other writers are active: their staging folders are theirs
        staging = self.local_root / STAGING
        removed = []
        for leftover in sorted(staging.iterdir()):
            if leftover.name == self._session:
                continue
            if leftover.is_dir():  # a crashed writer's uncommitted data or interrupted deletion
                shutil.rmtree(leftover, ignore_errors=True)
                removed.append(str(leftover))
            elif leftover.name.endswith(".tmp"):
                leftover.unlink(missing_ok=True)
                removed.append(str(leftover))
        for folder in scope.metadata_folders:  # a creation killed after its link
            for leftover in (self.local_root / folder).glob("zarr.json.*.tmp"):
                leftover.unlink(missing_ok=True)
                removed.append(str(leftover))
        lock = staging / "zarr.json"
        if lock.read_bytes() != _LOCK_CONTENT:  # a writer killed while creating it: rewrite the same inode
            with open(lock, "r+b") as fh:
                fh.truncate(0)
                fh.write(_LOCK_CONTENT)
        return GarbageReport(removed=tuple(removed))


_LOCK_CONTENT = group_json({"vinekv": "temporary area for writes in flight; never holds committed data"})


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
