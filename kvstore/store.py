"""`SnapshotStore`: per-trajectory KV on disk, any prefix readable as a `CachedState`.

Layout (Zarr v3, see docs/store-format.md)::

    /                                   attrs.vinekv: format, format_version, codec, layout
    runs/<run>/                         attrs.vinekv: kind = "run"
    runs/<run>/prompts/<key>/           prompt KV, stored once per content (tokens, policy, codes)
    runs/<run>/trajectories/<id>/       response KV + attrs: token ids, prompt ref, fields

A snapshot at token ``t`` is positions ``[0, t)`` of the prompt KV followed by the response KV.
The store is a facade over four parts, each in its module: what the JSON says
(`vinekv.kvstore.schema`), writing (`vinekv.kvstore.writes`: the door checks, a bounded queue of background
writers, atomic commits; with ``durability="flush"`` nodes are staged and committed together
at `SnapshotStore.flush` with one round of fsyncs), reading (`vinekv.kvstore.reads`: checked,
cached nodes and prefix snapshots) and where the nodes live (`vinekv.kvstore.backends`). A crash
leaves every committed trajectory intact and nothing half-written visible.

Integrity (format 2): every node's metadata is sealed with a digest that also covers its arrays'
metadata (`vinekv.kvstore.integrity`), chunks carry crc32c, and a missing chunk or file is an error, so
a read returns the stored KV, tokens and fields or raises an `IntegrityError` naming the file.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from vinekv.kvstore.backends.factory import open_backend
from vinekv.kvstore.backends.interface import GC_GRACE_S, Backend, GarbageReport, GarbageScope, GroupCommit
from vinekv.kvstore.codecs import KVCodec, get_codec
from vinekv.kvstore.errors import (
    CorruptChunkError,
    CorruptMetadataError,
    IntegrityError,
    MissingEntryError,
    StoreError,
    StoreFormatError,
)
from vinekv.kvstore.integrity import check_sealed, group_attrs, seal
from vinekv.kvstore.policy import check_policy
from vinekv.kvstore.reads import NodeReader, ReadPlan, read_sealed
from vinekv.kvstore.schema import (
    NODE_GROUPS,
    RootMeta,
    RunNode,
    TrajectoryNode,
    check_chunk_tokens,
    check_chunking,
    check_name,
    prompt_prefix,
    run_prefix,
    trajectory_prefix,
)
from vinekv.kvstore.state import CachedState, EncodedState, KVLayout
from vinekv.kvstore.tensorstore_backend import group_json
from vinekv.kvstore.writes import (
    NodeWriter,
    checked_spill,
    close_at_exit,
    exit_started,
    jsonable,
    update_fields,
    update_run_fields,
)

DEFAULT_CHUNK_TOKENS = 64
DEFAULT_MAX_INFLIGHT_BYTES = 512 * 2**20
DEFAULT_WRITE_CONCURRENCY = 4
DEFAULT_CACHE_BYTES = 64 * 2**20
DURABILITY = ("trajectory", "flush")
RUNS = "runs/"


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


class SnapshotStore:
    """A disk-backed store of per-trajectory KV snapshots. Open with `SnapshotStore.open`."""

    def __init__(
        self,
        backend: Backend,
        meta: RootMeta,
        mode: str,
        max_inflight_bytes: int,
        write_concurrency: int,
        durability: str,
    ):
        self._backend = backend
        self._meta = meta
        self.mode = mode
        self.durability = durability
        self.codec: KVCodec = get_codec(dict(meta.codec))
        self.chunk_tokens: int = meta.chunk_tokens
        self._layout_on_disk = meta.layout is not None
        self._closed = False
        self._closing = False  # set under `_door` when `close` starts: later spills are refused
        self._door = threading.Lock()  # a spill's last check and its queueing, vs. the start of `close`
        self.swept_on_open = GarbageReport()  # what opening for writing removed (`collect_garbage`)
        self._reader = NodeReader(backend, self.chunk_tokens, self._recorded_layout, self.runs)
        self._writer = NodeWriter(
            backend,
            self.codec,
            self.chunk_tokens,
            durability,
            self._record_layout,
            max_inflight_bytes,
            write_concurrency,
        )

    @property
    def max_inflight_bytes(self) -> int:
        return self._writer.queue.max_inflight_bytes

    @property
    def stats(self) -> dict[str, Any]:
        """Background-write counters: ``spilled`` trajectories, ``bytes`` queued (raw or codes),
        ``write_seconds`` summed over writers, ``peak_inflight_bytes``."""
        q = self._writer.queue
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
        check_chunk_tokens(chunk_tokens)
        if max_inflight_bytes < 1:
            raise ValueError(f"max_inflight_bytes must be positive, got {max_inflight_bytes}")
        if not isinstance(write_concurrency, int) or write_concurrency < 1:
            raise ValueError(f"write_concurrency must be a positive int, got {write_concurrency!r}")
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {DURABILITY}, got {durability!r}")
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or not 0 <= cache_bytes < 2**63:
            raise ValueError(f"cache_bytes must be an int in [0, 2**63), got {cache_bytes!r}")
        codec = get_codec(codec)
        check_chunking(codec, chunk_tokens)
        if mode != "r" and exit_started():
            raise RuntimeError(
                "the interpreter is exiting (its exit hooks have run): a store cannot be opened for writing now; "
                "open it before the main thread ends, or join the threads that use it"
            )
        _check_local_path(path_or_spec, mode)
        backend = open_backend(path_or_spec, durable_writes=durability == "trajectory", cache_bytes=cache_bytes)
        if durability == "flush" and not isinstance(backend, GroupCommit):
            raise ValueError("durability='flush' needs a local store (staging and rename); use 'trajectory'")
        root = backend.read_json("zarr.json")
        if root is None:
            if mode in ("r", "r+"):
                raise StoreFormatError(f"no vinekv store at {backend.description} (mode {mode!r} needs one)")
            meta = RootMeta(codec.spec(), chunk_tokens)
            runs = group_json({"vinekv": seal({"kind": "runs"})})
            if backend.create_root(group_json({"vinekv": seal(meta.to_attrs())}), {"runs/zarr.json": runs}):
                root = None
            elif mode == "w-":
                raise FileExistsError(f"a store was created at {backend.description} by another process (mode 'w-')")
            else:  # a racing creator won: use its store
                root = backend.read_json("zarr.json")
        elif mode == "w-":
            raise FileExistsError(f"a store already exists at {backend.description} (mode 'w-')")
        if root is not None:
            meta = _check_root(root, backend)
        store = cls(backend, meta, mode, max_inflight_bytes, write_concurrency, durability)
        if mode != "r":
            store.swept_on_open = backend.lock_for_writing(store._garbage_scope())
            close_at_exit(store)
        return store

    @property
    def is_local(self) -> bool:
        """Whether the store is a local directory (else an object store or ``memory://``)."""
        return self._backend.local

    @property
    def layout(self) -> KVLayout | None:
        """The KV layout every snapshot in this store has (set by the first spill)."""
        return self._meta.layout

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
            store's codec (on the device, see `vinekv.kvstore.capture.capture_encoded`).
          prompt_len: number of prompt tokens at the start of ``state`` (1 <= prompt_len <= T).
          **fields: JSON-able per-trajectory metadata (reward, step boundaries, gold answer...).

        Raises:
          the error of an earlier failed write, if any; ValueError/TypeError for bad input.
        """
        self._writer.queue.raise_errors()
        self._check_writable()
        spill = checked_spill(self.codec, run, trajectory_id, state, prompt_len, fields)
        with self._door:  # once `close` has started, nothing more is queued (it would never be committed)
            if self._closing:
                raise RuntimeError(f"store {self._backend.description} is closed: open it again to use it")
            layout = self.layout
            if layout is None:
                self._meta = dataclasses.replace(self._meta, layout=state.layout)
            elif layout != state.layout:
                ours, theirs = state.layout.to_dict(), layout.to_dict()
                diffs = {k: (v, theirs[k]) for k, v in ours.items() if theirs[k] != v}
                raise ValueError(f"snapshot layout does not match the store's: (snapshot, store) = {diffs}")
            self._writer.submit(spill)

    def flush(self) -> None:
        """Waits until every queued trajectory is committed (with ``durability="flush"``: commits
        them, with one round of fsyncs); raises the first write error."""
        self._check_open()
        self._writer.flush()

    def close(self) -> None:
        """Flushes, stops the writers and releases the store's write lock. A spill from another
        thread after `close` has started raises RuntimeError (it would never be committed)."""
        with self._door:
            if self._closed or self._closing:
                return
            self._closing = True
        try:
            self.flush()
        finally:
            self._closed = True
            self._writer.queue.close()
            self._backend.unlock()

    def _close_at_exit(self) -> None:
        """`close` from the interpreter's exit: the spills since the last flush are committed
        (the writer threads are still alive then) and the user is told; never raises."""
        if self._closed or self._closing:
            return
        if self._writer.unflushed:
            sys.stderr.write(
                f"vinekv: store {self._backend.description} was not closed: committing {self._writer.unflushed} "
                "spilled trajectories (since its last flush) at exit; call close(), or open it in a with block\n"
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

    def _record_layout(self) -> None:
        """Records the layout of the first spill in the root metadata, once (checked against a
        layout another writer may have recorded meanwhile)."""
        if self._layout_on_disk:
            return

        def record(document: dict[str, Any] | None) -> bytes:
            root = _check_root(document, self._backend)
            if root.layout not in (None, self.layout):
                raise ValueError(
                    f"another writer recorded layout {root.layout.to_dict()} in the store; this spill has "
                    f"{self.layout.to_dict()}"
                )
            return group_json({"vinekv": seal(dataclasses.replace(root, layout=self.layout).to_attrs())})

        self._backend.update_json("zarr.json", record, durable=True)
        self._layout_on_disk = True

    def _recorded_layout(self) -> KVLayout | None:
        """The store's layout; read again from the root when this handle has none yet (another
        writer may have spilled since it was opened)."""
        if self._meta.layout is None:
            root = _check_root(self._backend.read_json("zarr.json"), self._backend)
            if root.layout is not None:
                self._meta = root
                self._layout_on_disk = True
        return self.layout

    def annotate(self, run: str, trajectory_id: str | int, **fields: Any) -> None:
        """Merges JSON-able ``fields`` into a committed trajectory's ``fields`` attribute.

        One atomic metadata write: readers see the old or the new fields, never a mix; writers
        in other processes annotating the same trajectory are serialised (no lost update).
        """
        self._check_writable()
        run, tid = check_name("run", run), check_name("trajectory_id", trajectory_id)
        fields = jsonable(fields)
        try:
            update_fields(self._backend, run, tid, fields, self._reader.check_trajectory)
        except MissingEntryError:
            self._reader.run(run)
            raise
        self._reader.trajectory(run, tid, fresh=True)

    def annotate_run(self, run: str, **fields: Any) -> None:
        """Merges JSON-able ``fields`` into the run's own fields (`run_fields`), atomically, as
        `annotate` does for a trajectory; e.g. how the run's rollouts were sampled."""
        self._check_writable()
        run = check_name("run", run)
        update_run_fields(self._backend, run, jsonable(fields))

    def run_fields(self, run: str) -> dict[str, Any]:
        """The run's own fields as stored now (``{}`` for a run nothing was recorded about);
        `MissingEntryError` if there is no such run."""
        self._check_open()
        key = run_prefix(check_name("run", run)) + "zarr.json"
        attrs = read_sealed(self._backend, key)
        if attrs is None:
            raise MissingEntryError(f"no run {run!r} in the store (runs: {self.runs()})")
        return dict(RunNode.from_attrs(attrs, self._backend.location(key)).fields)

    # -- reading ---------------------------------------------------------------------------
    def runs(self) -> list[str]:
        """Committed runs, sorted. The remains of a deleted run (left by a write that raced the
        deletion under an older vinekv) are left out, `verify` reports them and `collect_garbage`
        removes them; a run whose own metadata is missing raises `CorruptMetadataError`."""
        self._check_open()
        damaged = self._run_remains()[1]
        if damaged:
            where = self._backend.location(run_prefix(damaged[0]) + "zarr.json")
            raise CorruptMetadataError(f"{where} is missing: the run's metadata was deleted")
        return self._backend.children(RUNS, skip_incomplete=True)

    def _run_remains(self) -> tuple[list[str], list[str]]:
        """``(remains, damaged)``: run folders without their metadata, split into the remains of
        a deleted run (a commit that raced the deletion under an older vinekv: no group
        metadata left in them) and runs whose metadata was deleted."""
        remains, damaged = [], []
        for name in self._backend.incomplete_children(RUNS):
            groups = [f"{run_prefix(name)}{sub}/zarr.json" for sub in NODE_GROUPS]
            (damaged if any(self._backend.exists(key) for key in groups) else remains).append(name)
        return remains, damaged

    def trajectories(self, run: str) -> list[str]:
        """Committed trajectory ids of ``run``, sorted."""
        self._check_open()
        run = check_name("run", run)
        self._reader.run(run)
        return self._backend.children(f"{run_prefix(run)}trajectories/")

    def trajectory(self, run: str, trajectory_id: str | int) -> TrajectoryNode:
        """The stored trajectory (`vinekv.kvstore.schema.TrajectoryNode`: token ids, prompt_len, length,
        fields, fingerprint, ...), read from the store at each call (another process may have
        annotated it since)."""
        self._check_open()
        return self._reader.trajectory(check_name("run", run), check_name("trajectory_id", trajectory_id), fresh=True)

    def trajectory_info(self, run: str, trajectory_id: str | int) -> dict[str, Any]:
        """`trajectory` as its stored attributes (a JSON object, see docs/store-format.md)."""
        return self.trajectory(run, trajectory_id).to_attrs()

    def token_ids(self, run: str, trajectory_id: str | int) -> list[int]:
        """All of a stored trajectory's token ids, prompt then response."""
        self._check_open()
        return self._reader.token_ids(check_name("run", run), check_name("trajectory_id", trajectory_id))

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
        self._reader.forget_changed_runs(runs)  # one metadata read per run: deleted, or deleted and written again?
        try:
            return self._read_states(requests, out_dtype, fingerprint, allow_stale, on_device)
        except CorruptChunkError:  # missing or other bytes: deleted (and written again) while being read?
            if not self._reader.forget_changed_runs(runs):
                raise
        return self._read_states(requests, out_dtype, fingerprint, allow_stale, on_device)

    def _read_states(self, requests, out_dtype, fingerprint, allow_stale, on_device) -> list[CachedState]:
        plans = [self.plan_read(run, tid, t) for run, tid, t in requests]
        if fingerprint is not None and not allow_stale:
            for plan in plans:
                check_policy(
                    plan.node.fingerprint, fingerprint, f"trajectory {plan.trajectory_id!r} of run {plan.run!r}"
                )
        return self._reader.read(plans, out_dtype, on_device)

    def _consumer(self, model: Any, fingerprint: str | None) -> tuple[Any, str | None]:
        """(kv dtype, fingerprint) of the model that will consume reads; checks its layout."""
        if model is None:
            return None, fingerprint
        from vinekv.kvstore.dense_cache import kv_layout
        from vinekv.kvstore.fingerprint import policy_fingerprint

        model_layout = kv_layout(model)
        if self.layout is not None:
            self.layout.check_compatible(model_layout, what="store")
        return np.dtype(model_layout.dtype), fingerprint or policy_fingerprint(model)

    def plan_read(self, run: str, trajectory_id: str | int, t: int) -> ReadPlan:
        """Which stored parts the snapshot ``[0, t)`` needs (a `ReadPlan`); `read_prefixes` runs
        plans, and a caller that decodes elsewhere can fetch a plan's codes itself with
        `ReadPart.start` / `ReadPart.result`."""
        self._check_open()
        return self._reader.plan(check_name("run", run), check_name("trajectory_id", trajectory_id), t)

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
        for run in self._backend.children(RUNS, skip_incomplete=True) if runs is None else runs:
            try:
                ids = self.trajectories(run)
            except IntegrityError as err:
                problems.append(StoreProblem(run, None, str(err)))
                continue
            for tid in ids:
                try:
                    plan = self.plan_read(run, tid, self._reader.trajectory(run, tid, fresh=True).length)
                    for part in plan.parts:
                        part.result(part.start(), plan.what)
                except IntegrityError as err:
                    problems.append(StoreProblem(run, tid, str(err)))
        return problems

    # -- accounting and deletion -------------------------------------------------------------
    def size(self, run: str) -> StoreSize:
        """Raw (uncompressed cache dtype) vs stored bytes of a run, prompts counted once."""
        self._check_open()
        run = check_name("run", run)
        self._reader.run(run)
        raw = 0
        prefixes = [trajectory_prefix(run, tid) for tid in self.trajectories(run)]
        prefixes += [prompt_prefix(run, p) for p in self._backend.children(f"{run_prefix(run)}prompts/")]
        for prefix in prefixes:
            node = self._reader.node(prefix)
            layout = node.layout
            per_token = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * np.dtype(layout.dtype).itemsize
            raw += node.stored_tokens * per_token
        return StoreSize(raw=raw, stored=self._backend.stored_bytes(run_prefix(run)))

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
        report = self._backend.collect_garbage(self._garbage_scope(), float(grace_s))
        remains = [run_prefix(name) for name in self._run_remains()[0]]
        for prefix in remains:
            self._backend.delete_prefix(prefix)
        removed = tuple(self._backend.location(prefix).rstrip("/") for prefix in remains)
        return dataclasses.replace(report, removed=report.removed + removed) if removed else report

    def delete_run(self, run: str) -> None:
        """Removes a run and everything in it, atomically: after a crash the run is either whole
        or gone (its remains are swept when the store is next opened for writing)."""
        self._check_writable()
        run = check_name("run", run)
        self._reader.run(run)
        self.flush()
        self._backend.retire(run_prefix(run))
        self._reader.forget_run(run)

    def _garbage_scope(self) -> GarbageScope:
        """Where garbage may be: the root's and ``runs/``'s folders (an interrupted creation's
        temporary files) and each run folder's node groups, owned by the run's marker."""

        def node_groups() -> dict[str, str]:
            return {
                f"{run_prefix(name)}{sub}/": run_prefix(name) + "zarr.json"
                for name in self._backend.folders(RUNS)
                for sub in NODE_GROUPS
            }

        return GarbageScope(metadata_folders=("", RUNS), node_groups=node_groups)


def _check_root(root: dict[str, Any] | None, backend: Backend) -> RootMeta:
    """The root's attributes, checked: a vinekv store of this format version, digests of the root
    and ``runs/`` intact, codec, chunking and layout well formed."""
    where = backend.location("zarr.json")
    if root is None:
        raise CorruptMetadataError(f"{where} is missing")
    attrs = root.get("attributes", {}).get("vinekv") if isinstance(root.get("attributes"), dict) else None
    if root.get("node_type") != "group":
        attrs = None
    RootMeta.check_format(attrs, where)
    meta = RootMeta.from_attrs(check_sealed(group_attrs(root, where), where), where)
    if read_sealed(backend, RUNS + "zarr.json") is None:
        raise CorruptMetadataError(f"{backend.location(RUNS + 'zarr.json')} is missing")
    return meta


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
    if mode in ("r", "r+") and not path.exists():
        raise StoreFormatError(f"no vinekv store at {path} (mode {mode!r} needs one; nothing was created)")
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
