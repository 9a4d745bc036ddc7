"""`SnapshotStore`: per-trajectory KV on disk, any prefix readable as a `CachedState`.

Layout (Zarr v3, see docs/store-format.md)::

    /                                   attrs.vinekv: format, format_version, codec, layout
    runs/<run>/                         attrs.vinekv: kind = "run"
    runs/<run>/prompts/<prompt_key>/    prompt KV, stored once per (prompt tokens, fingerprint)
    runs/<run>/trajectories/<id>/       response KV + attrs: token ids, prompt ref, fields

A snapshot at token ``t`` is positions ``[0, t)`` of the prompt KV followed by the response KV.
Writes go through a `SpillQueue` (background writers, a bound on the bytes in flight); each node
is committed atomically (see `tensorstore_backend`), so a crash leaves every committed trajectory
intact and nothing half-written visible. With ``durability="flush"`` trajectories are staged
as they are written and committed together at `SnapshotStore.flush` with one round of fsyncs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from kvstore.codecs import KVCodec, get_codec
from kvstore.codecs.base import StoredArray
from kvstore.errors import CorruptChunkError, MissingEntryError, StoreError, StoreFormatError
from kvstore.policy import check_policy
from kvstore.reads import ReadPart, ReadPlan
from kvstore.spill_queue import SpillQueue
from kvstore.state import CachedState, EncodedState, KVLayout
from kvstore.tensorstore_backend import TensorStoreBackend, group_json

logger = logging.getLogger(__name__)

FORMAT = "vinekv.kvstore"
FORMAT_VERSION = 1
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


def prompt_key(token_ids: np.ndarray, fingerprint: str) -> str:
    """Name of the shared prompt node for these prompt tokens under this policy."""
    digest = hashlib.blake2b(np.asarray(token_ids, np.int32).tobytes(), digest_size=10, key=fingerprint.encode()[:64])
    return digest.hexdigest()


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
        self._lock = threading.Lock()
        self._prompt_locks: dict[str, threading.Lock] = {}
        self._staged: list[tuple[str, str, str | None]] = []  # (staging, final, requires) for the group commit
        self._staged_keys: set[str] = set()
        self._closed = False
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
        if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
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
        backend = TensorStoreBackend(path_or_spec, durable_writes=durability == "trajectory", cache_bytes=cache_bytes)
        if durability == "flush" and backend.local_root is None:
            raise ValueError("durability='flush' needs a local store (staging and rename); use 'trajectory'")
        root = backend.read_json("zarr.json")
        if root is None:
            if mode in ("r", "r+"):
                raise StoreFormatError(f"no vinekv store at {backend.description} (mode {mode!r} needs one)")
            attrs = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "codec": codec.spec(),
                "chunk_tokens": chunk_tokens,
                "layout": None,
                "about": "KV snapshots of rollouts written by vinekv; see docs/store-format.md",
            }
            backend.write_durable("runs/zarr.json", group_json({"vinekv": {"kind": "runs"}}))
            backend.write_durable("zarr.json", group_json({"vinekv": attrs}))
        else:
            if mode == "w-":
                raise FileExistsError(f"a store already exists at {backend.description} (mode 'w-')")
            attrs = _check_root(root, backend.description)
        store = cls(backend, attrs, mode, max_inflight_bytes, write_concurrency, durability)
        if mode != "r":
            backend.lock_for_writing()
        return store

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

    def flush(self) -> None:
        """Waits until every queued trajectory is committed (with ``durability="flush"``: commits
        them, with one round of fsyncs); raises the first write error."""
        try:
            self._queue.drain()
        finally:
            self._commit_staged()

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

    def _check_writable(self) -> None:
        if self.mode == "r":
            raise PermissionError("store is open read-only (mode 'r')")
        if self._closed:
            raise RuntimeError(f"store {self._backend.description} is closed: open it again to write")

    def _commit_staged(self) -> None:
        with self._lock:
            staged, self._staged = self._staged, []
        try:
            failed = self._backend.commit_group(staged)
        finally:  # every node of the batch is now committed or discarded
            with self._lock:
                self._staged_keys.difference_update(final for _, final, _ in staged)
        if failed:
            (final, err), more = failed[0], len(failed) - 1
            tail = f" (and {more} more)" if more else ""
            raise StoreError(f"group commit of {final} failed: {err}{tail}") from err

    def _write_trajectory(self, item: _Spill) -> None:
        state, plen = item.state, item.prompt_len
        with self._lock:  # writers create the root layout and a run's groups once
            self._ensure_root_layout()
            if not self._backend.exists(f"runs/{item.run}/zarr.json"):
                for sub in ("prompts", "trajectories"):
                    self._ensure_group(f"runs/{item.run}/{sub}/", {"kind": sub})
                self._ensure_group(f"runs/{item.run}/", {"kind": "run", "created": time.time()})
        tokens = state.token_ids[0]
        pkey = prompt_key(tokens[:plen], state.fingerprint)
        common = {"fingerprint": state.fingerprint, "layout": state.layout.to_dict(), "codec": self.codec.spec()}
        prompt_prefix = f"runs/{item.run}/prompts/{pkey}/"
        with self._lock:
            prompt_lock = self._prompt_locks.setdefault(prompt_prefix, threading.Lock())
        with prompt_lock:  # trajectories of one prompt in flight together write it once
            if prompt_prefix not in self._staged_keys and not self._backend.exists(prompt_prefix + "zarr.json"):
                attrs = {"kind": "prompt", "length": plen, "token_ids": tokens[:plen].tolist(), **common}
                self._write_node(prompt_prefix, _codes(self.codec, state, 0, plen), attrs)
        attrs = {
            "kind": "trajectory",
            "format_version": FORMAT_VERSION,
            "prompt": pkey,
            "prompt_len": plen,
            "length": state.position,
            "response_token_ids": tokens[plen:].tolist(),
            "fields": item.fields,
            **common,
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
        try:
            futures = [
                self._backend.write_array(
                    staging + name,
                    stored.data,
                    stored.dims,
                    self.chunk_tokens // stored.token_group,
                    self.codec.zstd_level,
                    {"vinekv": {"codec": self.codec.spec(), "array": name, "token_group": stored.token_group}},
                )
                for name, stored in (codes or {}).items()
            ]
            for future in futures:
                future.result()
            if self.durability == "flush":
                self._backend.stage(staging, {"vinekv": attrs})
                with self._lock:
                    self._staged.append((staging, final_prefix, requires))
                    self._staged_keys.add(final_prefix)
            else:
                self._backend.commit(staging, final_prefix, {"vinekv": attrs})
        except BaseException:
            self._backend.discard(staging)
            raise

    def _ensure_group(self, prefix: str, attrs: dict[str, Any]) -> None:
        if not self._backend.exists(prefix + "zarr.json"):
            self._backend.write_durable(prefix + "zarr.json", group_json({"vinekv": attrs}))

    def _ensure_root_layout(self) -> None:
        if not self._layout_on_disk:
            self._backend.write_durable("zarr.json", group_json({"vinekv": self._meta}))
            self._layout_on_disk = True

    # -- reading ---------------------------------------------------------------------------
    def runs(self) -> list[str]:
        return self._backend.children("runs/")

    def trajectories(self, run: str) -> list[str]:
        """Committed trajectory ids of ``run``, sorted."""
        self._require_run(run)
        return self._backend.children(f"runs/{run}/trajectories/")

    def trajectory_info(self, run: str, trajectory_id: str | int) -> dict[str, Any]:
        """The trajectory's attributes: token ids, prompt_len, length, fields, fingerprint, ..."""
        tid = str(trajectory_id)
        key = _traj_prefix(run, tid)
        if key not in self._attrs_cache:
            node = self._backend.read_json(key + "zarr.json")
            if node is None:
                self._require_run(run)
                raise MissingEntryError(f"no trajectory {tid!r} in run {run!r}")
            self._attrs_cache[key] = node["attributes"]["vinekv"]
        return self._attrs_cache[key]

    def token_ids(self, run: str, trajectory_id: str | int) -> list[int]:
        """All of a stored trajectory's token ids, prompt then response."""
        info = self.trajectory_info(run, trajectory_id)
        prompt = self._node_attrs(f"runs/{run}/prompts/{info['prompt']}/")
        return prompt["token_ids"] + info["response_token_ids"]

    def annotate(self, run: str, trajectory_id: str | int, **fields: Any) -> None:
        """Merges JSON-able ``fields`` into a committed trajectory's ``fields`` attribute.

        One atomic metadata write: readers see the old or the new fields, never a mix.
        """
        self._check_writable()
        tid = str(trajectory_id)
        key = _traj_prefix(run, tid)
        self._attrs_cache.pop(key, None)
        info = dict(self.trajectory_info(run, tid))
        info["fields"] = {**info["fields"], **_jsonable(fields)}
        self._backend.write_bytes(key + "zarr.json", group_json({"vinekv": info}))
        self._attrs_cache[key] = info

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
        """
        requests = [(r, str(tid), t) for r, tid, t in requests]
        out_dtype, fingerprint = self._consumer(model, fingerprint)
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
                codes = part.result(part_futures, plan.what, self.chunk_tokens)
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
        tid = str(trajectory_id)
        info = self.trajectory_info(run, tid)
        length, plen = info["length"], info["prompt_len"]
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or not 1 <= t <= length:
            raise ValueError(f"t={t!r} outside [1, {length}] for trajectory {tid!r} of run {run!r} ({length} tokens)")
        spans = [(f"runs/{run}/prompts/{info['prompt']}/", 0, min(t, plen))]
        if t > plen:
            spans.append((_traj_prefix(run, tid), plen, t - plen))
        parts = []
        for prefix, offset, stop in spans:
            codec = get_codec(self._node_attrs(prefix)["codec"])
            arrays = {name: self._array(prefix + name) for name in codec.array_names}
            parts.append(ReadPart(prefix, offset, stop, codec, arrays))
        tokens = np.asarray(self.token_ids(run, tid)[:t], dtype=np.int32)
        return ReadPlan(run, tid, int(t), info, tuple(parts), tokens)

    def _node_attrs(self, prefix: str) -> dict[str, Any]:
        if prefix not in self._attrs_cache:
            node = self._backend.read_json(prefix + "zarr.json")
            if node is None:
                raise CorruptChunkError(f"missing node {prefix} referenced by a trajectory")
            self._attrs_cache[prefix] = node["attributes"]["vinekv"]
        return self._attrs_cache[prefix]

    def _array(self, path: str) -> Any:
        if path not in self._arrays:
            self._arrays[path] = self._backend.open_array(path)
        return self._arrays[path]

    def _require_run(self, run: str) -> None:
        if not self._backend.exists(f"runs/{run}/zarr.json"):
            raise MissingEntryError(f"no run {run!r} in the store (runs: {self.runs()})")

    # -- accounting and deletion -------------------------------------------------------------
    def size(self, run: str) -> StoreSize:
        """Raw (uncompressed cache dtype) vs stored bytes of a run, prompts counted once."""
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

    def delete_run(self, run: str) -> None:
        """Removes a run and everything in it."""
        self._check_writable()
        self._require_run(run)
        self.flush()
        self._backend.delete_prefix(f"runs/{run}/")
        self._attrs_cache = {k: v for k, v in self._attrs_cache.items() if not k.startswith(f"runs/{run}/")}
        self._arrays = {k: v for k, v in self._arrays.items() if not k.startswith(f"runs/{run}/")}


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


def _check_chunking(codec: KVCodec, chunk_tokens: int) -> None:
    for name, group in codec.token_groups().items():
        if chunk_tokens % group:
            raise ValueError(
                f"chunk_tokens {chunk_tokens} must be a multiple of codec {codec.name!r}'s token group {group} "
                f"(array {name!r})"
            )


def _traj_prefix(run: str, tid: str) -> str:
    return f"runs/{run}/trajectories/{tid}/"


def _check_root(root: dict[str, Any], where: str) -> dict[str, Any]:
    attrs = root.get("attributes", {}).get("vinekv")
    if root.get("node_type") != "group" or not isinstance(attrs, dict) or attrs.get("format") != FORMAT:
        raise StoreFormatError(f"{where} holds a Zarr node that is not a vinekv store (no attributes.vinekv.format)")
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise StoreFormatError(
            f"store {where} has format version {version!r}; this vinekv reads version {FORMAT_VERSION}"
        )
    return attrs


def _check_local_path(path_or_spec: Any, mode: str) -> None:
    """Clear errors for local paths that cannot be a store, before TensorStore sees them."""
    if isinstance(path_or_spec, dict) or "://" in str(path_or_spec):
        return
    path = Path(path_or_spec).expanduser()
    if path.exists() and not path.is_dir():
        raise StoreFormatError(f"{path} is a file, not a vinekv store directory")
    if path.is_dir() and not (path / "zarr.json").exists() and any(path.iterdir()):
        raise StoreFormatError(f"{path} is a non-empty directory without zarr.json: not a vinekv store")
    if mode != "r":
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(err.errno, f"cannot create the store at {path}: {err.strerror}") from err


__all__ = [
    "CorruptChunkError",
    "MissingEntryError",
    "SnapshotStore",
    "StoreError",
    "StoreFormatError",
    "StoreSize",
]
