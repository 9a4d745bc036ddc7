"""`SnapshotStore`: per-trajectory KV on disk, any prefix readable as a `CachedState`.

Layout (Zarr v3, see docs/store-format.md)::

    /                                   attrs.vinekv: format, format_version, codec, layout
    runs/<run>/                         attrs.vinekv: kind = "run"
    runs/<run>/prompts/<key>/           prompt KV, stored once per content (tokens, policy, codes)
    runs/<run>/trajectories/<id>/       response KV + attrs: token ids, prompt ref, fields

A snapshot at token ``t`` is positions ``[0, t)`` of the prompt KV followed by the response KV.
Writes go through a `SpillQueue` (background writers, a bound on the bytes in flight); each node
is committed atomically (see `tensorstore_backend`), so a crash leaves every committed trajectory
intact and nothing half-written visible. With ``durability="flush"`` trajectories are staged
as they are written and committed together at `SnapshotStore.flush` with one round of fsyncs.

Integrity (format 2): every node's metadata is sealed with a digest that also covers its arrays'
metadata (`kvstore.integrity`), chunks carry crc32c, and a missing chunk or file is an error, so
a read returns the stored KV, tokens and fields or raises an `IntegrityError` naming the file.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 (registers its exit hook before `_close_open_writers`)
import contextlib
import dataclasses
import functools
import json
import logging
import re
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.codecs import KVCodec, get_codec
from kvstore.codecs.base import StoredArray, token_entries
from kvstore.errors import (
    CorruptChunkError,
    CorruptMetadataError,
    IntegrityError,
    MissingEntryError,
    StoreError,
    StoreFormatError,
)
from kvstore.integrity import (
    check_layout,
    check_node,
    check_sealed,
    chunk_hashes,
    group_attrs,
    json_digest,
    prompt_content_key,
    seal,
)
from kvstore.policy import check_policy
from kvstore.reads import ReadPart, ReadPlan
from kvstore.spill_checks import check_finite, check_token_ids
from kvstore.spill_queue import SpillQueue
from kvstore.state import CachedState, EncodedState, KVLayout
from kvstore.tensorstore_backend import GC_GRACE_S, GarbageReport, TensorStoreBackend, group_json, open_backend

logger = logging.getLogger(__name__)

FORMAT = "vinekv.kvstore"
FORMAT_VERSION = 2
MAX_CHUNK_TOKENS = 2**16
DEFAULT_CHUNK_TOKENS = 64
DEFAULT_MAX_INFLIGHT_BYTES = 512 * 2**20
DEFAULT_WRITE_CONCURRENCY = 4
DEFAULT_CACHE_BYTES = 64 * 2**20
DURABILITY = ("trajectory", "flush")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclasses.dataclass(frozen=True)
class StoreSize:
    """Bytes of a run: ``raw`` as the KV would take uncompressed in its cache dtype, ``stored`` on disk."""

    raw: int
    stored: int

    @property
    def ratio(self) -> float:
        return self.raw / self.stored if self.stored else float("nan")


@dataclasses.dataclass(frozen=True)
class StoreProblem:
    """A damaged or missing piece of a run found by `SnapshotStore.verify`; ``message`` names the
    file (``trajectory_id`` None: the run's own metadata)."""

    run: str
    trajectory_id: str | None
    message: str


RESERVED_NAMES = ("zarr.json",)  # the store's own file names
RESERVED_FIELDS = ("mc",)  # written by `replay_run` (`annotate`), never by `spill`


def _check_name(kind: str, name: Any) -> str:
    """``name`` (a str or int id) as a str, or ValueError/TypeError naming the rule it breaks."""
    if isinstance(name, bool) or not isinstance(name, str | int | np.integer):
        raise TypeError(f"{kind} must be a str or an int, got {type(name).__name__}")
    name = str(name)
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{kind} {name!r} breaks the naming rule: 1-128 characters, letters, digits, '_', '.' and '-' "
            "only (no spaces, slashes or control characters), not starting with '.' or '-'"
        )
    if name in RESERVED_NAMES:
        raise ValueError(f"{kind} {name!r} is reserved (a file name of the store's own)")
    return name


def _jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with numpy scalars/arrays turned into JSON values; TypeError if impossible."""

    def convert(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"field value {value!r} of type {type(value).__name__} is not JSON-serialisable")

    return json.loads(json.dumps(fields, default=convert))


@dataclasses.dataclass
class _Spill:
    run: str
    trajectory_id: str
    state: CachedState | EncodedState
    prompt_len: int
    fields: dict[str, Any]


class SnapshotStore:
    """A disk-backed store of per-trajectory KV snapshots. Open with `SnapshotStore.open`."""

    def __init__(
        self,
        backend: TensorStoreBackend,
        root_attrs: dict[str, Any],
        mode: str,
        max_inflight_bytes: int,
        write_concurrency: int,
        durability: str,
    ):
        self._backend = backend
        self._meta = root_attrs
        self.mode = mode
        self.durability = durability
        self.codec: KVCodec = get_codec(root_attrs["codec"])
        self.chunk_tokens: int = root_attrs["chunk_tokens"]
        self._attrs_cache: dict[str, dict[str, Any]] = {}
        self._arrays: dict[str, Any] = {}
        self._verified_runs: set[str] = set()
        self._generations: dict[str, str | None] = {}  # each verified run's generation (None: made before them)
        self._lock = threading.Lock()
        self._prompt_locks: dict[str, threading.Lock] = {}
        self._staged: list[tuple[str, str, str | None]] = []  # (staging, final, requires) for the group commit
        self._staged_keys: set[str] = set()
        self._shared: set[str] = set()  # content-addressed prompt prefixes (another writer may commit them too)
        self._closed = False
        self._unflushed = 0  # trajectories spilled since the last flush
        self.swept_on_open = GarbageReport()  # what opening for writing removed (`collect_garbage`)
        self._layout_on_disk = root_attrs.get("layout") is not None
        self._queue = SpillQueue(
            self._write_trajectory,
            max_inflight_bytes,
            write_concurrency,
            describe=lambda item: f"trajectory {item.trajectory_id!r} of run {item.run!r}",
        )

    @property
    def max_inflight_bytes(self) -> int:
        return self._queue.max_inflight_bytes

    @property
    def stats(self) -> dict[str, Any]:
        """Background-write counters: ``spilled`` trajectories, ``bytes`` queued (raw or codes),
        ``write_seconds`` summed over writers, ``peak_inflight_bytes``."""
        q = self._queue
        return {
            "spilled": q.stats["written"],
            "bytes": q.stats["bytes"],
            "write_seconds": q.stats["write_seconds"],
            "peak_inflight_bytes": q.peak_inflight_bytes,
        }

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path_or_spec: str | Path | dict[str, Any],
        mode: str = "a",
        codec: str | dict[str, Any] | KVCodec = "int8",
        *,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        write_concurrency: int = DEFAULT_WRITE_CONCURRENCY,
        durability: str = "trajectory",
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> SnapshotStore:
        """Opens (or creates) a store.

        Args:
          path_or_spec: local path, TensorStore kvstore URL (``memory://name/``) or JSON spec.
          mode: ``"r"`` read only; ``"r+"`` read/write, must exist; ``"a"`` read/write, created
            if missing; ``"w-"`` create, must not exist.
          codec: codec of new trajectories in a new store (``"int8"``, ``"int4"``,
            ``"lossless"``, a spec such as ``{"name": "int4", "group_size": 32}``, or a
            `KVCodec`); an existing store keeps the codec it was created with.
          chunk_tokens: tokens per stored chunk (the unit a prefix read fetches) of a new store.
          max_inflight_bytes: bytes queued or being written (raw KV of a `CachedState`, codes of
            an `EncodedState`) before `spill` blocks.
          write_concurrency: trajectories written at once by background threads (commit
            latency, mostly fsync, overlaps; commits may land out of spill order).
          durability: ``"trajectory"`` (default): each trajectory is committed, fsynced, as
            soon as it is written. ``"flush"``: trajectories are staged as they are written and
            committed together at `flush` (or `close`) with one round of fsyncs; each is still
            atomic, and a crash loses only those spilled since the last flush.
          cache_bytes: decoded chunks kept in memory for reads (a replay reads a shared
            prompt's chunks once); 0 disables the cache.
        """
        if mode not in ("r", "r+", "a", "w-"):
            raise ValueError(f"mode must be 'r', 'r+', 'a' or 'w-', got {mode!r}")
        _check_chunk_tokens(chunk_tokens)
        if max_inflight_bytes < 1:
            raise ValueError(f"max_inflight_bytes must be positive, got {max_inflight_bytes}")
        if not isinstance(write_concurrency, int) or write_concurrency < 1:
            raise ValueError(f"write_concurrency must be a positive int, got {write_concurrency!r}")
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {DURABILITY}, got {durability!r}")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise ValueError(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        codec = get_codec(codec)
        _check_chunking(codec, chunk_tokens)
        _check_local_path(path_or_spec, mode)
        backend = open_backend(path_or_spec, durable_writes=durability == "trajectory", cache_bytes=cache_bytes)
        if durability == "flush" and not backend.group_commit:
            raise ValueError("durability='flush' needs a local store (staging and rename); use 'trajectory'")
        root = backend.read_json("zarr.json")
        if root is None:
            if mode in ("r", "r+"):
                raise StoreFormatError(f"no vinekv store at {backend.description} (mode {mode!r} needs one)")
            attrs = seal(
                {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "codec": codec.spec(),
                    "chunk_tokens": chunk_tokens,
                    "layout": None,
                    "about": "KV snapshots of rollouts written by vinekv; see docs/store-format.md",
                }
            )
            runs = group_json({"vinekv": seal({"kind": "runs"})})
            if backend.create_root(group_json({"vinekv": attrs}), {"runs/zarr.json": runs}):
                root = None
            elif mode == "w-":
                raise FileExistsError(f"a store was created at {backend.description} by another process (mode 'w-')")
            else:  # a racing creator won: use its store
                root = backend.read_json("zarr.json")
        elif mode == "w-":
            raise FileExistsError(f"a store already exists at {backend.description} (mode 'w-')")
        if root is not None:
            attrs = _check_root(root, backend)
        store = cls(backend, attrs, mode, max_inflight_bytes, write_concurrency, durability)
        if mode != "r":
            store.swept_on_open = backend.lock_for_writing()
            _OPEN_WRITERS.add(store)
        return store

    @property
    def is_local(self) -> bool:
        """Whether the store is a local directory (else an object store or ``memory://``)."""
        return self._backend.group_commit

    @property
    def layout(self) -> KVLayout | None:
        """The KV layout every snapshot in this store has (set by the first spill)."""
        layout = self._meta.get("layout")
        return KVLayout.from_dict(layout) if layout else None

    def __repr__(self) -> str:
        return f"SnapshotStore({self._backend.description}, mode={self.mode!r}, codec={self.codec!r})"

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------
    def spill(
        self, run: str, trajectory_id: str | int, state: CachedState | EncodedState, prompt_len: int, **fields: Any
    ) -> None:
        """Queues one trajectory's KV for writing and returns (blocks only when the queue is full).

        Args:
          run: the run (rollout batch / iteration) the trajectory belongs to.
          trajectory_id: unique within the run.
          state: `CachedState` of batch 1 covering the whole trajectory, prompt and response
            (encoded on the host by a writer thread), or an `EncodedState` encoded with this
            store's codec (on the device, see `kvstore.capture.capture_encoded`).
          prompt_len: number of prompt tokens at the start of ``state`` (1 <= prompt_len <= T).
          **fields: JSON-able per-trajectory metadata (reward, step boundaries, gold answer...).

        Raises:
          the error of an earlier failed write, if any; ValueError/TypeError for bad input.
        """
        self._queue.raise_errors()
        self._check_writable()
        run = _check_name("run", run)
        tid = _check_name("trajectory_id", trajectory_id)
        if not isinstance(state, CachedState | EncodedState):
            raise TypeError(f"state must be a CachedState or an EncodedState, got {type(state).__name__}")
        if state.batch != 1:
            raise ValueError(f"spill takes one trajectory (batch 1), got a state of batch {state.batch}")
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int | np.integer):
            raise TypeError(f"prompt_len must be an int, got {prompt_len!r}")
        if not 1 <= prompt_len <= state.position:
            raise ValueError(f"prompt_len {prompt_len} outside [1, {state.position}] (the trajectory's length)")
        reserved = sorted(set(fields) & set(RESERVED_FIELDS))
        if reserved:
            raise ValueError(f"field names {reserved} are reserved: replay_run writes the MC values there")
        if isinstance(state, EncodedState):
            if state.codec != self.codec.spec():
                raise ValueError(f"state was encoded with codec {state.codec['name']!r}, the store uses {self.codec!r}")
            if state.prompt_len != int(prompt_len):
                raise ValueError(f"prompt_len {prompt_len} != the {state.prompt_len} the state was encoded with")
        check_token_ids(state.token_ids, state.layout.vocab_size)
        check_finite(state)
        fields = _jsonable(fields)
        layout = self.layout
        if layout is None:
            self._meta["layout"] = state.layout.to_dict()
        elif layout != state.layout:
            diffs = {k: (v, layout.to_dict()[k]) for k, v in state.layout.to_dict().items() if layout.to_dict()[k] != v}
            raise ValueError(f"snapshot layout does not match the store's: (snapshot, store) = {diffs}")
        prefix = _traj_prefix(run, tid)
        if prefix in self._staged_keys or self._backend.exists(prefix + "zarr.json"):
            raise FileExistsError(f"trajectory {tid!r} of run {run!r} is already in the store")
        try:
            self._queue.put(prefix, _Spill(run, tid, state, int(prompt_len), fields), state.nbytes)
        except FileExistsError:
            raise FileExistsError(f"trajectory {tid!r} of run {run!r} is already in the store") from None
        self._unflushed += 1

    def flush(self) -> None:
        """Waits until every queued trajectory is committed (with ``durability="flush"``: commits
        them, with one round of fsyncs); raises the first write error."""
        self._check_open()
        try:
            self._queue.drain()
        finally:
            self._commit_staged()
        self._unflushed = 0

    def close(self) -> None:
        """Flushes, stops the writers and releases the store's write lock."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._queue.close()
            self._backend.unlock()

    def _close_at_exit(self) -> None:
        """`close` from the interpreter's exit: the spills since the last flush are committed
        (the writer threads are still alive then) and the user is told; never raises."""
        if self._closed:
            return
        if self._unflushed:
            sys.stderr.write(
                f"vinekv: store {self._backend.description} was not closed: committing {self._unflushed} spilled "
                "trajectories (since its last flush) at exit; call close(), or open it in a with block\n"
            )
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 (exit must go on; the store's atomic commits keep it consistent)
            sys.stderr.write(
                f"vinekv: store {self._backend.description}: spills could not be committed at exit: {err}\n"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"store {self._backend.description} is closed: open it again to use it")

    def _check_writable(self) -> None:
        self._check_open()
        if self.mode == "r":
            raise PermissionError("store is open read-only (mode 'r')")

    def _commit_staged(self) -> None:
        with self._lock:
            staged, self._staged = self._staged, []
        if not staged:
            return
        try:
            failed = self._backend.commit_group(staged, frozenset(self._shared))
        finally:  # every node of the batch is now committed or discarded
            with self._lock:
                self._staged_keys.difference_update(final for _, final, _ in staged)
        if failed:
            (final, err), more = failed[0], len(failed) - 1
            tail = f" (and {more} more)" if more else ""
            raise StoreError(f"group commit of {final} failed: {err}{tail}") from err

    def _write_trajectory(self, item: _Spill) -> None:
        try:
            self._write_trajectory_nodes(item)
        except MissingEntryError as err:  # the run's folder went away between `_ensure_run` and a commit
            raise MissingEntryError(
                f"run {item.run!r} was deleted while trajectory {item.trajectory_id!r} was being written: "
                f"not stored ({err})"
            ) from err

    def _write_trajectory_nodes(self, item: _Spill) -> None:
        state, plen = item.state, item.prompt_len
        with self._lock:  # writers create the root layout and a run's groups once
            self._ensure_root_layout()
            generation = self._ensure_run(item.run)
        tokens = state.token_ids[0]
        common = {"fingerprint": state.fingerprint, "layout": state.layout.to_dict(), "codec": self.codec.spec()}
        prompt_codes = _codes(self.codec, state, 0, plen)
        pkey = prompt_content_key(tokens[:plen], state.fingerprint, common["layout"], common["codec"], prompt_codes)
        prompt_prefix = f"runs/{item.run}/prompts/{pkey}/"
        with self._lock:
            prompt_lock = self._prompt_locks.setdefault(prompt_prefix, threading.Lock())
            self._shared.add(prompt_prefix)
        with prompt_lock:  # trajectories of one prompt in flight together write it once
            if prompt_prefix not in self._staged_keys and not self._backend.exists(prompt_prefix + "zarr.json"):
                identity = {"node": {"at": prompt_prefix, "generation": generation}}
                attrs = {"kind": "prompt", "length": plen, "token_ids": tokens[:plen].tolist(), **common, **identity}
                with contextlib.suppress(FileExistsError):  # another writer committed the same content first
                    self._write_node(prompt_prefix, prompt_codes, attrs)
        attrs = {
            "kind": "trajectory",
            "format_version": FORMAT_VERSION,
            "prompt": pkey,
            "prompt_len": plen,
            "length": state.position,
            "response_token_ids": tokens[plen:].tolist(),
            "fields": item.fields,
            **common,
            "node": {"at": _traj_prefix(item.run, item.trajectory_id), "generation": generation},
        }
        codes = _codes(self.codec, state, plen, None)
        self._write_node(_traj_prefix(item.run, item.trajectory_id), codes, attrs, requires=prompt_prefix)

    def _write_node(
        self,
        final_prefix: str,
        codes: dict[str, StoredArray] | None,
        attrs: dict[str, Any],
        requires: str | None = None,
    ) -> None:
        """Writes a node's stored arrays (None: no tokens) and ``attrs``, committed atomically
        now (``durability="trajectory"``) or staged for the next flush."""
        staging = self._backend.staging_prefix(final_prefix)
        futures = []
        try:
            for name, stored in (codes or {}).items():  # appended one by one: each started write is awaited below
                attributes = {"vinekv": {"codec": self.codec.spec(), "array": name, "token_group": stored.token_group}}
                chunk_entries = self.chunk_tokens // stored.token_group
                futures.append(
                    self._backend.write_array(
                        staging + name, stored.data, stored.dims, chunk_entries, self.codec.zstd_level, attributes
                    )
                )
            for future in futures:
                future.result()
            arrays = {name: json_digest(self._backend.read_json(f"{staging}{name}/zarr.json")) for name in codes or {}}
            hashes = {
                name: chunk_hashes(stored.data, self.chunk_tokens // stored.token_group)
                for name, stored in (codes or {}).items()
            }
            data = self._backend.data_path(staging, final_prefix)
            body = {**attrs, "arrays": arrays, "chunk_hashes": hashes, **({"data": data} if data else {})}
            sealed = {"vinekv": seal(body)}
            if self.durability == "flush":
                self._backend.stage(staging, sealed)
                with self._lock:
                    self._staged.append((staging, final_prefix, requires))
                    self._staged_keys.add(final_prefix)
            else:
                self._backend.commit(staging, final_prefix, sealed)
        except BaseException:
            for future in futures:  # no write may land in the staging folder after it is discarded
                with contextlib.suppress(Exception):  # the first failure is the one raised
                    future.result()
            self._backend.discard(staging)
            raise

    def _ensure_run(self, run: str) -> str | None:
        """Creates the run's groups, atomically (a crash leaves no half-made run), with a fresh
        generation; returns the run's generation (None: a run made before generations)."""
        prefix = f"runs/{run}/"
        attrs = self._read_node(prefix)
        if attrs is None:
            generation = uuid.uuid4().hex
            subgroups = {
                f"{sub}/zarr.json": group_json({"vinekv": seal({"kind": sub})}) for sub in ("prompts", "trajectories")
            }
            run_attrs = {"kind": "run", "created": time.time(), "generation": generation}
            if self._backend.create_group(prefix, {"vinekv": seal(run_attrs)}, subgroups):
                return generation
            attrs = self._read_node(prefix) or {}  # a racing writer created it first
        return attrs.get("generation")

    def _ensure_root_layout(self) -> None:
        """Records the layout of the first spill in the root metadata (checked against a layout
        another writer may have recorded meanwhile)."""
        if self._layout_on_disk:
            return

        def record(document: dict[str, Any] | None) -> bytes:
            root = _check_root(document, self._backend)
            if root.get("layout") not in (None, self._meta["layout"]):
                theirs, ours = root["layout"], self._meta["layout"]
                raise ValueError(f"another writer recorded layout {theirs} in the store; this spill has {ours}")
            return group_json({"vinekv": seal({**root, "layout": self._meta["layout"]})})

        self._backend.update_json("zarr.json", record, durable=True)
        self._layout_on_disk = True

    # -- reading ---------------------------------------------------------------------------
    def runs(self) -> list[str]:
        """Committed runs, sorted. The remains of a deleted run (left by a write that raced the
        deletion under an older vinekv) are left out, `verify` reports them and `collect_garbage`
        removes them; a run whose own metadata is missing raises `CorruptMetadataError`."""
        self._check_open()
        damaged = self._run_remains()[1]
        if damaged:
            where = self._backend.location(f"runs/{damaged[0]}/zarr.json")
            raise CorruptMetadataError(f"{where} is missing: the run's metadata was deleted")
        return self._backend.children("runs/", skip_incomplete=True)

    def _run_remains(self) -> tuple[list[str], list[str]]:
        """``(remains, damaged)``: run folders without their metadata, split into the remains of
        a deleted run (a commit that raced the deletion under an older vinekv: no group
        metadata left in them) and runs whose metadata was deleted."""
        remains, damaged = [], []
        for name in self._backend.incomplete_children("runs/"):
            groups = [f"runs/{name}/{sub}/zarr.json" for sub in ("prompts", "trajectories")]
            (damaged if any(self._backend.exists(key) for key in groups) else remains).append(name)
        return remains, damaged

    def trajectories(self, run: str) -> list[str]:
        """Committed trajectory ids of ``run``, sorted."""
        self._check_open()
        run = _check_name("run", run)
        self._require_run(run)
        return self._backend.children(f"runs/{run}/trajectories/")

    def trajectory_info(self, run: str, trajectory_id: str | int) -> dict[str, Any]:
        """The trajectory's attributes: token ids, prompt_len, length, fields, fingerprint, ...;
        read from the store at each call (another process may have annotated it since)."""
        self._check_open()
        run, tid = _check_name("run", run), _check_name("trajectory_id", trajectory_id)
        self._attrs_cache.pop(_traj_prefix(run, tid), None)
        return self._trajectory_attrs(run, tid)

    def _trajectory_attrs(self, run: str, tid: str) -> dict[str, Any]:
        """`trajectory_info` as first read by this handle (what reads need never changes while the
        run's generation does not)."""
        key = _traj_prefix(run, tid)
        if key not in self._attrs_cache:
            info = self._read_node(key)
            if info is None:
                self._require_run(run)
                raise MissingEntryError(f"no trajectory {tid!r} in run {run!r}")
            self._cache_node(run, key, info, "trajectory")
        return self._attrs_cache[key]

    def _cache_node(self, run: str, prefix: str, attrs: dict[str, Any], kind: str) -> None:
        """Checks a node's attributes (`check_node`, the store's layout, that they are the ones
        written at ``prefix`` of the run's current generation) and caches them. A node of a newer
        generation than this handle knows means the run was deleted and written again: what the
        handle cached of it is dropped first."""
        where = self._backend.location(prefix + "zarr.json")
        self._check_node(attrs, kind, where)
        identity = attrs.get("node")  # absent in nodes written before identities were sealed
        if identity is not None:
            if identity.get("at") != prefix:
                raise CorruptMetadataError(
                    f"{where}: this metadata belongs to {identity.get('at')} (a node's files copied over another's)"
                )
            if identity.get("generation") != self._run_generation(run):
                self._forget_run(run)
                if identity.get("generation") != self._run_generation(run):
                    raise CorruptMetadataError(
                        f"{where}: written into generation {identity.get('generation')} of run {run!r}, which was "
                        f"deleted (the run is now generation {self._run_generation(run)})"
                    )
        self._attrs_cache[prefix] = attrs

    def _run_generation(self, run: str) -> str | None:
        """The run's generation as this handle first read it."""
        self._require_run(run)
        return self._generations.get(run)

    def _forget_run(self, run: str) -> None:
        """Drops what this handle cached of ``run`` (metadata, opened arrays)."""
        self._verified_runs.discard(run)
        self._generations.pop(run, None)
        self._attrs_cache = {k: v for k, v in self._attrs_cache.items() if not k.startswith(f"runs/{run}/")}
        self._arrays = {k: v for k, v in self._arrays.items() if not k.startswith(f"runs/{run}/")}

    def _forget_changed_runs(self, runs: Iterable[str]) -> bool:
        """Forgets each of ``runs`` whose generation in the store is not the one cached; whether
        any was. Raises `MissingEntryError` for a run deleted since it was cached."""
        changed = False
        for run in runs:
            if run not in self._verified_runs:
                continue
            attrs = self._read_node(f"runs/{run}/")
            if attrs is None:
                self._forget_run(run)
                raise MissingEntryError(f"run {run!r} was deleted after this handle read it")
            if attrs.get("generation") != self._generations.get(run):
                self._forget_run(run)
                changed = True
        return changed

    def token_ids(self, run: str, trajectory_id: str | int) -> list[int]:
        """All of a stored trajectory's token ids, prompt then response."""
        self._check_open()
        run, tid = _check_name("run", run), _check_name("trajectory_id", trajectory_id)
        info = self._trajectory_attrs(run, tid)
        prompt = self._node_attrs(f"runs/{run}/prompts/{info['prompt']}/")
        return prompt["token_ids"] + info["response_token_ids"]

    def annotate(self, run: str, trajectory_id: str | int, **fields: Any) -> None:
        """Merges JSON-able ``fields`` into a committed trajectory's ``fields`` attribute.

        One atomic metadata write: readers see the old or the new fields, never a mix; writers
        in other processes annotating the same trajectory are serialised (no lost update).
        """
        self._check_writable()
        run, tid = _check_name("run", run), _check_name("trajectory_id", trajectory_id)
        key = _traj_prefix(run, tid)
        fields = _jsonable(fields)
        where = self._backend.location(key + "zarr.json")

        def merge(document: dict[str, Any] | None) -> bytes:
            info = _sealed(document, where)
            if info is None:
                self._require_run(run)
                raise MissingEntryError(f"no trajectory {tid!r} in run {run!r}")
            self._check_node(info, "trajectory", where)
            return group_json({"vinekv": seal({**info, "fields": {**info["fields"], **fields}})})

        self._attrs_cache.pop(key, None)
        self._backend.update_json(key + "zarr.json", merge)

    def read_prefix(
        self,
        run: str,
        trajectory_id: str | int,
        t: int,
        model: Any = None,
        allow_stale: bool = False,
        *,
        fingerprint: str | None = None,
        on_device: bool = False,
    ) -> CachedState:
        """The snapshot of positions ``[0, t)`` of a stored trajectory.

        Args:
          run, trajectory_id: which trajectory.
          t: prefix length, 1 <= t <= the trajectory's length.
          model: when given, the KV is decoded to its kv dtype, its layout is checked, and the
            snapshot's policy fingerprint must equal the model's unless ``allow_stale``.
          allow_stale: accept snapshots made by another policy.
          fingerprint: ``model``'s `policy_fingerprint` when the caller already has it (else
            computed, once per version of the model's weights).
          on_device: decode on the default device; keys/values are then jax arrays.

        Returns:
          a `CachedState` of batch 1, ready for `resume_from_state`.
        """
        requests = [(run, trajectory_id, t)]
        return self.read_prefixes(
            requests, model=model, allow_stale=allow_stale, fingerprint=fingerprint, on_device=on_device
        )[0]

    def read_prefixes(
        self,
        requests: Iterable[tuple[str, str | int, int]],
        model: Any = None,
        allow_stale: bool = False,
        *,
        fingerprint: str | None = None,
        on_device: bool = False,
    ) -> list[CachedState]:
        """`read_prefix` for many ``(run, trajectory_id, t)`` at once; all reads are issued
        asynchronously before any is awaited, so I/O and decompression overlap.

        With ``on_device``, the codes are decompressed and verified on the host, moved to the
        default device and decoded there (`KVCodec.device_decode`, bit-identical to the host
        decode): the states' keys/values are then jax arrays. Codes are padded to whole chunks,
        so the decode compiles once per chunk count, but cutting the result to ``t`` still
        compiles a small program per new length (~0.1 s on a CPU): `replay_run` decodes on the
        host for that reason.

        Each call reads each run's metadata once: a run another process deleted since this handle
        cached it raises `MissingEntryError`; one deleted and written again is read anew, whole
        (a chunk that changes during the read fails its node's content hash and the read is redone).
        """
        requests = [(r, str(tid), t) for r, tid, t in requests]
        out_dtype, fingerprint = self._consumer(model, fingerprint)
        runs = {run for run, _, _ in requests}
        self._forget_changed_runs(runs)  # one metadata read per run: deleted, or deleted and written again?
        try:
            return self._read_states(requests, out_dtype, fingerprint, allow_stale, on_device)
        except CorruptChunkError:  # missing or other bytes: deleted (and written again) while being read?
            if not self._forget_changed_runs(runs):
                raise
        return self._read_states(requests, out_dtype, fingerprint, allow_stale, on_device)

    def _read_states(self, requests, out_dtype, fingerprint, allow_stale, on_device) -> list[CachedState]:
        plans = [self.plan_read(run, tid, t) for run, tid, t in requests]
        started = [[part.start() for part in plan.parts] for plan in plans]
        states = []
        for plan, futures in zip(plans, started, strict=True):
            info = plan.info
            if fingerprint is not None and not allow_stale:
                check_policy(info["fingerprint"], fingerprint, f"trajectory {plan.trajectory_id!r} of run {plan.run!r}")
            layout = KVLayout.from_dict(info["layout"])
            dtype = out_dtype or np.dtype(layout.dtype)
            blocks = []
            for part, part_futures in zip(plan.parts, futures, strict=True):
                codes = part.result(part_futures, plan.what)
                if on_device:  # padded to whole chunks: one compiled decode per chunk count
                    padded = _pad_to_chunks(codes, part.codec.token_groups(), self.chunk_tokens)
                    blocks.append(part.codec.device_decode(padded, layout.dtype, dtype)[:, :, : part.stop])
                else:
                    blocks.append(part.codec.decode(codes, layout.dtype, dtype))
            xp = _array_module(on_device)
            kv = xp.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0]
            out_layout = dataclasses.replace(layout, dtype=np.dtype(dtype).name)
            keys, values = kv[:, 0][:, None], kv[:, 1][:, None]
            states.append(CachedState(keys, values, plan.token_ids[None], out_layout, info["fingerprint"]))
        return states

    def _consumer(self, model: Any, fingerprint: str | None) -> tuple[Any, str | None]:
        """(kv dtype, fingerprint) of the model that will consume reads; checks its layout."""
        if model is None:
            return None, fingerprint
        from kvstore.dense_cache import kv_layout
        from kvstore.fingerprint import policy_fingerprint

        model_layout = kv_layout(model)
        if self.layout is not None:
            self.layout.check_compatible(model_layout, what="store")
        return np.dtype(model_layout.dtype), fingerprint or policy_fingerprint(model)

    def plan_read(self, run: str, trajectory_id: str | int, t: int) -> ReadPlan:
        """Which stored parts the snapshot ``[0, t)`` needs (a `ReadPlan`); `read_prefixes` runs
        plans, and a caller that decodes elsewhere can fetch a plan's codes itself with
        `ReadPart.start` / `ReadPart.result`."""
        self._check_open()
        run, tid = _check_name("run", run), _check_name("trajectory_id", trajectory_id)
        info = self._trajectory_attrs(run, tid)
        length, plen = info["length"], info["prompt_len"]
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or not 1 <= t <= length:
            raise ValueError(f"t={t!r} outside [1, {length}] for trajectory {tid!r} of run {run!r} ({length} tokens)")
        prompt_prefix = f"runs/{run}/prompts/{info['prompt']}/"
        held = self._node_attrs(prompt_prefix)["length"]
        if held != plen:
            where = self._backend.location(_traj_prefix(run, tid) + "zarr.json")
            raise CorruptMetadataError(
                f"{where}: prompt_len {plen}, but its prompt node {prompt_prefix} holds {held} tokens"
            )
        spans = [(prompt_prefix, 0, min(t, plen))]
        if t > plen:
            spans.append((_traj_prefix(run, tid), plen, t - plen))
        parts = []
        for prefix, offset, stop in spans:
            attrs = self._node_attrs(prefix)
            codec = _node_codec(attrs, self._backend.location(prefix + "zarr.json"))
            arrays = {name: self._array(prefix, name, attrs, codec) for name in codec.array_names}
            location = self._backend.location(prefix)
            parts.append(
                ReadPart(prefix, offset, stop, codec, arrays, location, self.chunk_tokens, attrs.get("chunk_hashes"))
            )
        tokens = np.asarray(self.token_ids(run, tid)[:t], dtype=np.int32)
        return ReadPlan(run, tid, int(t), info, tuple(parts), tokens)

    def _read_node(self, prefix: str) -> dict[str, Any] | None:
        """A node's verified ``attributes.vinekv`` (None if it has no ``zarr.json``)."""
        return _read_sealed(self._backend, prefix + "zarr.json")

    def _node_attrs(self, prefix: str) -> dict[str, Any]:
        if prefix not in self._attrs_cache:
            attrs, where = self._read_node(prefix), self._backend.location(prefix + "zarr.json")
            if attrs is None:
                raise CorruptMetadataError(f"{where} is missing (a node a trajectory references)")
            run = prefix.split("/")[1]  # runs/<run>/...
            self._cache_node(run, prefix, attrs, "prompt" if "/prompts/" in prefix else "trajectory")
        return self._attrs_cache[prefix]

    def _array(self, prefix: str, name: str, node: dict[str, Any], codec: KVCodec) -> Any:
        """A node's stored array, its metadata checked against the digest the node recorded and
        against what ``codec`` (the node's) stores for the store's layout."""
        path = prefix + node.get("data", "") + name
        if path not in self._arrays:
            where = self._backend.location(path + "/zarr.json")
            expected = node.get("arrays", {}).get(name)
            if expected is None:
                raise CorruptMetadataError(
                    f"{self._backend.location(prefix + 'zarr.json')}: no record of array {name!r}"
                )
            metadata = self._backend.read_json(path + "/zarr.json")
            if metadata is None:
                raise CorruptMetadataError(f"{where} is missing (array metadata of a committed node)")
            if json_digest(metadata) != expected:
                raise CorruptMetadataError(f"{where}: array metadata does not match the digest its node recorded")
            tokens = node["length"] - node.get("prompt_len", 0) if node["kind"] == "trajectory" else node["length"]
            entries = token_entries(tokens, codec.token_groups()[name])
            shape = metadata.get("shape")
            if not isinstance(shape, list) or len(shape) < 3 or shape[2] != entries:
                raise CorruptMetadataError(f"{where}: shape {shape} does not hold the node's {tokens} tokens")
            other_axes, dtype = _array_geometry(codec, self.layout)[name]
            if shape[:2] + shape[3:] != other_axes or metadata.get("data_type") != dtype:
                raise CorruptMetadataError(
                    f"{where}: shape {shape} / data_type {metadata.get('data_type')!r} is not what codec "
                    f"{codec.name!r} stores for the store's layout ({other_axes} besides the token axis, {dtype})"
                )
            try:
                self._arrays[path] = self._backend.open_array(path, metadata)
            except (ValueError, TypeError, OverflowError) as err:
                raise CorruptMetadataError(f"{where}: TensorStore cannot open the array ({err})") from None
        return self._arrays[path]

    def _check_node(self, attrs: dict[str, Any], kind: str, where: str) -> None:
        """`check_node`, and the node's layout must be the store's (every snapshot shares it)."""
        check_node(attrs, kind, where)
        if KVLayout.from_dict(attrs["layout"]) != self._recorded_layout():
            raise CorruptMetadataError(f"{where}: layout {attrs['layout']} is not the store's {self._meta['layout']}")

    def _recorded_layout(self) -> KVLayout | None:
        """The store's layout; read again from the root when this handle has none yet (another
        writer may have spilled since it was opened)."""
        if self._meta.get("layout") is None:
            root = _check_root(self._backend.read_json("zarr.json"), self._backend)
            if root.get("layout") is not None:
                self._meta["layout"] = root["layout"]
                self._layout_on_disk = True
        return self.layout

    def _require_run(self, run: str) -> None:
        if run in self._verified_runs:
            return
        attrs = self._read_node(f"runs/{run}/")
        if attrs is None:
            raise MissingEntryError(f"no run {run!r} in the store (runs: {self.runs()})")
        self._generations[run] = attrs.get("generation")
        for sub in ("prompts", "trajectories"):
            if self._read_node(f"runs/{run}/{sub}/") is None:
                raise CorruptMetadataError(f"{self._backend.location(f'runs/{run}/{sub}/zarr.json')} is missing")
        self._verified_runs.add(run)

    def verify(self, runs: Iterable[str] | None = None) -> list[StoreProblem]:
        """Checks every byte of ``runs`` (default: all): each node's and array's metadata against
        its digest and every stored chunk against its checksum, by reading each trajectory whole.
        Returns the problems found (empty: the runs are intact); never raises `IntegrityError`."""
        self._check_open()
        problems = []
        if runs is None:
            remains, damaged = self._run_remains()
            for name in remains:
                where = self._backend.location(f"runs/{name}/")
                message = f"{where}: remains of a deleted run (a write raced its deletion); `vinekv gc` removes them"
                problems.append(StoreProblem(name, None, message))
            for name in damaged:
                where = self._backend.location(f"runs/{name}/zarr.json")
                problems.append(StoreProblem(name, None, f"{where} is missing: the run's metadata was deleted"))
        for run in self._backend.children("runs/", skip_incomplete=True) if runs is None else runs:
            try:
                ids = self.trajectories(run)
            except IntegrityError as err:
                problems.append(StoreProblem(run, None, str(err)))
                continue
            for tid in ids:
                try:
                    plan = self.plan_read(run, tid, self.trajectory_info(run, tid)["length"])
                    for part in plan.parts:
                        part.result(part.start(), plan.what)
                except IntegrityError as err:
                    problems.append(StoreProblem(run, tid, str(err)))
        return problems

    # -- accounting and deletion -------------------------------------------------------------
    def size(self, run: str) -> StoreSize:
        """Raw (uncompressed cache dtype) vs stored bytes of a run, prompts counted once."""
        self._check_open()
        run = _check_name("run", run)
        self._require_run(run)
        raw = 0
        prefixes = [_traj_prefix(run, tid) for tid in self.trajectories(run)]
        prefixes += [f"runs/{run}/prompts/{p}/" for p in self._backend.children(f"runs/{run}/prompts/")]
        for prefix in prefixes:
            info = self._node_attrs(prefix)
            layout = KVLayout.from_dict(info["layout"])
            tokens = info["length"] - info.get("prompt_len", 0) if info["kind"] == "trajectory" else info["length"]
            per_token = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * np.dtype(layout.dtype).itemsize
            raw += tokens * per_token
        return StoreSize(raw=raw, stored=self._backend.stored_bytes(f"runs/{run}/"))

    def collect_garbage(self, grace_s: float = GC_GRACE_S) -> GarbageReport:
        """Removes what crashed writers and interrupted deletions left behind (never a committed
        node). Opening a store for writing does this first (`swept_on_open`), with the default
        grace period. On a local store the staging area is swept then, when no other writer is
        active, and this call adds nothing. Elsewhere it removes unmarked attempts older than
        ``grace_s`` seconds (younger ones may be writes in flight: a grace shorter than the
        longest write, or than the clock skew between writers, can remove an attempt whose
        marker is about to be written) and the remains of deleted runs."""
        self._check_writable()
        if isinstance(grace_s, bool) or not isinstance(grace_s, int | float) or not grace_s >= 0:
            raise ValueError(f"grace_s must be a number of seconds >= 0, got {grace_s!r}")
        self.flush()
        report = self._backend.collect_garbage(float(grace_s))
        remains = [f"runs/{name}/" for name in self._run_remains()[0]]
        for prefix in remains:
            self._backend.delete_prefix(prefix)
        removed = tuple(self._backend.location(prefix).rstrip("/") for prefix in remains)
        return dataclasses.replace(report, removed=report.removed + removed) if removed else report

    def delete_run(self, run: str) -> None:
        """Removes a run and everything in it, atomically: after a crash the run is either whole
        or gone (its remains are swept when the store is next opened for writing)."""
        self._check_writable()
        run = _check_name("run", run)
        self._require_run(run)
        self.flush()
        self._backend.retire(f"runs/{run}/")
        self._forget_run(run)


_OPEN_WRITERS: weakref.WeakSet[SnapshotStore] = weakref.WeakSet()  # stores open for writing, closed at exit


def _close_open_writers() -> None:
    """Commits what stores left open at exit had queued, instead of losing it with the daemon
    writer threads (and aborting in TensorStore's threads as the interpreter goes down)."""
    for store in list(_OPEN_WRITERS):
        store._close_at_exit()


# Threading's exit hooks run before `atexit`'s, last registered first; concurrent.futures' hook
# (imported above: registered earlier) stops its executors, which a commit still needs, so it
# must run after this one.
getattr(threading, "_register_atexit", atexit.register)(_close_open_writers)


def _codes(codec: KVCodec, state: CachedState | EncodedState, lo: int, hi: int | None) -> dict[str, StoredArray] | None:
    """Stored arrays of tokens ``[lo, hi)`` (``hi`` None: to the end) of a spilled state, which
    is either the prompt (``lo == 0``) or the response; None when the part has no tokens."""
    if isinstance(state, EncodedState):
        tokens = state.prompt_len if lo == 0 else state.position - state.prompt_len
        return (state.prompt if lo == 0 else state.response) if tokens else None
    keys = state.keys[:, 0, lo:hi]
    return codec.encode(keys, state.values[:, 0, lo:hi]) if keys.shape[1] else None


def _pad_to_chunks(codes: dict[str, np.ndarray], groups: dict[str, int], chunk_tokens: int) -> dict[str, np.ndarray]:
    """Codes zero-padded along the token axis to whole chunks of ``chunk_tokens`` tokens."""
    padded = {}
    for name, array in codes.items():
        step = chunk_tokens // groups[name]
        extra = -array.shape[2] % step
        padded[name] = np.pad(array, [(0, 0), (0, 0), (0, extra)] + [(0, 0)] * (array.ndim - 3)) if extra else array
    return padded


def _array_module(on_device: bool) -> Any:
    if on_device:
        import jax.numpy as jnp

        return jnp
    return np


def _check_chunk_tokens(chunk_tokens: Any) -> int:
    """``chunk_tokens`` if it is an int in ``[1, MAX_CHUNK_TOKENS]``, else ValueError."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or not 1 <= chunk_tokens <= MAX_CHUNK_TOKENS:
        raise ValueError(f"chunk_tokens must be an int in [1, {MAX_CHUNK_TOKENS}], got {chunk_tokens!r}")
    return chunk_tokens


def _check_chunking(codec: KVCodec, chunk_tokens: int) -> None:
    for name, group in codec.token_groups().items():
        if chunk_tokens % group:
            raise ValueError(
                f"chunk_tokens {chunk_tokens} must be a multiple of codec {codec.name!r}'s token group {group} "
                f"(array {name!r})"
            )


@functools.lru_cache(maxsize=16)
def _array_geometry(codec: KVCodec, layout: KVLayout) -> dict[str, tuple[list[int], str]]:
    """Per stored array of ``codec`` for ``layout``: its axes other than the token axis, and its
    dtype (from encoding one token)."""
    one = np.zeros((layout.num_layers, 1, layout.num_kv_heads, layout.head_dim), np.dtype(layout.dtype))
    return {
        name: ([*stored.data.shape[:2], *stored.data.shape[3:]], str(stored.data.dtype))
        for name, stored in codec.encode(one, one).items()
    }


def _node_codec(attrs: dict[str, Any], where: str) -> KVCodec:
    """The codec a node records, or `CorruptMetadataError` naming its file."""
    try:
        return get_codec(attrs["codec"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptMetadataError(f"{where}: malformed codec {attrs.get('codec')!r} ({err})") from None


def _traj_prefix(run: str, tid: str) -> str:
    return f"runs/{run}/trajectories/{tid}/"


def _check_root(root: dict[str, Any] | None, backend: TensorStoreBackend) -> dict[str, Any]:
    """The root's attributes, checked: a vinekv store of this format version, digests of the root
    and ``runs/`` intact, codec, chunking and layout well formed."""
    where = backend.location("zarr.json")
    if root is None:
        raise CorruptMetadataError(f"{where} is missing")
    attrs = root.get("attributes", {}).get("vinekv") if isinstance(root.get("attributes"), dict) else None
    if root.get("node_type") != "group" or not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise StoreFormatError(f"{where}: a Zarr node that is not a vinekv store (no attributes.vinekv.format)")
    version = attrs.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise StoreFormatError(f"{where}: store format version {version!r}; this vinekv reads version {FORMAT_VERSION}")
    _sealed(root, where)
    try:
        _check_chunking(get_codec(attrs["codec"]), _check_chunk_tokens(attrs["chunk_tokens"]))
        if attrs["layout"] is not None:
            check_layout(attrs["layout"], where)
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptMetadataError(f"{where}: malformed store attributes ({type(err).__name__}: {err})") from None
    if _read_sealed(backend, "runs/zarr.json") is None:
        raise CorruptMetadataError(f"{backend.location('runs/zarr.json')} is missing")
    return attrs


def _read_sealed(backend: TensorStoreBackend, key: str) -> dict[str, Any] | None:
    """The verified ``attributes.vinekv`` of the group ``zarr.json`` at ``key`` (None if absent)."""
    return _sealed(backend.read_json(key), backend.location(key))


def _sealed(node: dict[str, Any] | None, where: str) -> dict[str, Any] | None:
    """The verified ``attributes.vinekv`` of a group document read from ``where`` (None if absent)."""
    return None if node is None else check_sealed(group_attrs(node, where), where)


def _check_local_path(path_or_spec: Any, mode: str) -> None:
    """Clear errors for local paths that cannot be a store, before TensorStore sees them. A
    directory holding only what an interrupted creation leaves is a store still to be created."""
    if isinstance(path_or_spec, dict) or "://" in str(path_or_spec):
        return
    path = Path(path_or_spec).expanduser()
    if path.exists() and not path.is_dir():
        raise StoreFormatError(f"{path} is a file, not a vinekv store directory")
    if path.is_dir() and not (path / "zarr.json").exists() and not _creation_leftovers(path):
        raise StoreFormatError(f"{path} is a non-empty directory without zarr.json: not a vinekv store")
    if mode != "r":
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, f"cannot create the store at {path}: {err.strerror}") from err


def _creation_leftovers(path: Path) -> bool:
    """Whether a directory without ``zarr.json`` holds nothing but an unfinished store creation
    (``runs/zarr.json``, the staging folder, temporary files), or nothing at all."""

    def temporary(p: Path) -> bool:
        return p.is_file() and p.name.startswith("zarr.json.") and p.name.endswith(".tmp")

    for entry in path.iterdir():
        if entry.name == ".staging" and entry.is_dir():
            continue
        if (
            entry.name == "runs"
            and entry.is_dir()
            and all(p.name == "zarr.json" or temporary(p) for p in entry.iterdir())
        ):
            continue
        if not temporary(entry):
            return False
    return True


__all__ = [
    "CorruptChunkError",
    "CorruptMetadataError",
    "IntegrityError",
    "MissingEntryError",
    "SnapshotStore",
    "StoreError",
    "StoreFormatError",
    "StoreProblem",
    "StoreSize",
]
