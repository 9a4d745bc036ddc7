"""The backend contract: what the store needs from the place its nodes live.

A node is a folder of Zarr v3 arrays plus its group ``zarr.json``; it becomes visible when its
``zarr.json`` appears, whole, through `Backend.commit`. Keys are relative to the store root
(``runs/r0/trajectories/t0/zarr.json``). Every implementation promises:

- **atomic commit**: a node is visible whole or not at all; racing commits of one prefix end
  with exactly one node, the losers get `FileExistsError` and their data is discarded;
- **atomic retire**: a deleted node disappears at once (what a crash leaves behind is found by
  `collect_garbage`, never read as a node);
- **atomic metadata update** without lost updates between writers (`update_json`);
- **garbage collection** that never touches a committed node, told by the store which prefixes
  hold nodes (`GarbageScope`): a backend parses no store layout.

Group commit (stage many nodes, make them durable in one round, then visible) is a capability
a backend declares by implementing `GroupCommit`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

GC_GRACE_S = 3600.0  # unmarked attempts younger than this may be writes in flight


@dataclasses.dataclass(frozen=True)
class GarbageReport:
    """What `Backend.collect_garbage` did.

    Attributes:
      removed: locations removed (uncommitted attempts, interrupted deletions, staging leftovers).
      kept: unmarked attempts younger than the grace period, left alone (writes may be in flight).
      busy: other writers of a local store were active, so its staging area was not swept.
    """

    removed: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    busy: bool = False


@dataclasses.dataclass(frozen=True)
class GarbageScope:
    """The store's layout as garbage collection needs it, given by the store.

    Attributes:
      metadata_folders: folders where an interrupted creation may leave temporary
        ``zarr.json.*.tmp`` files (``""``: the root).
      node_groups: lists, when called, every group prefix whose child folders are nodes, mapped
        to the key of its owner's marker (a run's ``zarr.json``): the nodes of a group whose
        owner is gone are the remains of an interrupted deletion.
    """

    metadata_folders: tuple[str, ...] = ()
    node_groups: Callable[[], Mapping[str, str]] = dict


class Backend(abc.ABC):
    """Where a store's nodes live, and how they are committed (see the module docstring)."""

    durable_writes: bool

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """The location, for messages."""

    @property
    def local(self) -> bool:
        """Whether the store is a local directory (its files can be listed and sized cheaply)."""
        return False

    @abc.abstractmethod
    def location(self, key: str) -> str:
        """Where ``key`` is, for error messages."""

    # -- plain keys ------------------------------------------------------------------------
    @abc.abstractmethod
    def read_json(self, key: str) -> dict[str, Any] | None:
        """The JSON object at ``key`` (None if absent); `CorruptMetadataError` if it is not one."""

    @abc.abstractmethod
    def write_bytes(self, key: str, value: bytes) -> None:
        """Writes ``key`` (not atomic with anything else: for uncommitted data)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` holds a value."""

    @abc.abstractmethod
    def keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, relative to the root, sorted."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Removes everything under ``prefix`` (not atomic: for uncommitted data and leftovers)."""

    @abc.abstractmethod
    def folders(self, prefix: str) -> list[str]:
        """Names of the child folders of ``prefix`` holding anything, committed or not."""

    # -- arrays ----------------------------------------------------------------------------
    @abc.abstractmethod
    def write_array(
        self,
        path: str,
        data: np.ndarray,
        dims: tuple[str, ...],
        chunk_entries: int,
        zstd_level: int,
        attributes: dict[str, Any],
    ) -> Any:
        """Starts writing ``data`` as an array at a fresh ``path``, inner chunks of
        ``chunk_entries`` along axis 2 (the token axis); returns a future."""

    @abc.abstractmethod
    def open_array(self, path: str, metadata: dict[str, Any] | None = None) -> Any:
        """Opens a committed array for reading (``metadata``: its verified ``zarr.json``)."""

    # -- nodes -----------------------------------------------------------------------------
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
        there, `MissingEntryError` if the group it goes into was deleted. ``durable`` (default:
        ``durable_writes``) applies where writes are fsynced."""

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
    def update_json(
        self, key: str, change: Callable[[dict[str, Any] | None], bytes], durable: bool | None = None
    ) -> bytes:
        """Replaces the JSON document at ``key`` with ``change(current)`` atomically (readers see
        the old or the new value) and without lost updates between writers: ``change`` may be
        called again with a newer value when another writer updated it meanwhile. Returns what
        was written."""

    # -- writers and garbage -----------------------------------------------------------------
    @abc.abstractmethod
    def lock_for_writing(self, scope: GarbageScope) -> GarbageReport:
        """Registers this writer and removes what crashed writers left (`collect_garbage` with the
        default grace period); returns what it removed."""

    @abc.abstractmethod
    def unlock(self) -> None:
        """Releases what `lock_for_writing` took."""

    @abc.abstractmethod
    def collect_garbage(self, scope: GarbageScope, grace_s: float = GC_GRACE_S) -> GarbageReport:
        """Removes what crashed writers and deletions left behind in ``scope``; never touches a
        committed node."""


class GroupCommit(abc.ABC):
    """The group-commit capability: nodes staged as they are written, made durable together in
    one round and then visible (``durability="flush"``)."""

    @abc.abstractmethod
    def stage(self, staging: str, attributes: dict[str, Any], durable: bool | None = None) -> None:
        """Writes a staged node's group ``zarr.json`` (not yet visible)."""

    @abc.abstractmethod
    def commit_group(
        self, nodes: list[tuple[str, str, str | None]], shared: frozenset[str] = frozenset()
    ) -> list[tuple[str, BaseException]]:
        """Commits staged ``(staging, final_prefix, requires)`` nodes in order, durably; a node
        whose ``requires`` did not commit is not committed either; a node in ``shared``
        (content-addressed) another writer committed first counts as committed. Returns
        ``(final_prefix, error)`` of the nodes not committed (their data discarded)."""
