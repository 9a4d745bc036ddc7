"""Writing a store: what `spill` refuses at the door, the spill queue's node writer, annotations.

A spilled trajectory becomes two nodes: its prompt's (content-addressed, written once however
many trajectories share it) and its own. Each node's arrays are written under a staging prefix
and the node committed atomically by the backend (`vinekv.kvstore.backends.interface`), now
(``durability="trajectory"``) or with the next flush's group commit (``"flush"``). Every node
seals its identity (its prefix and its run's generation) and a content hash of each chunk.

A store left open at exit is closed by an exit hook: what was spilled is committed (the writer
threads still run then) and the user is told on stderr.
"""

from __future__ import annotations

import atexit
import concurrent.futures.thread  # noqa: F401 (registers its exit hook before `_close_open_writers`)
import contextlib
import dataclasses
import json
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from vinekv.kvstore.backends.interface import Backend, GroupCommit
from vinekv.kvstore.codecs import KVCodec
from vinekv.kvstore.codecs.base import StoredArray
from vinekv.kvstore.errors import MissingEntryError, StoreError
from vinekv.kvstore.integrity import check_sealed, chunk_hashes, group_attrs, json_digest, prompt_content_key, seal
from vinekv.kvstore.reads import read_sealed
from vinekv.kvstore.schema import (
    NODE_GROUPS,
    RESERVED_FIELDS,
    NodeIdentity,
    PromptNode,
    RunNode,
    TrajectoryNode,
    check_name,
    prompt_prefix,
    run_prefix,
    trajectory_prefix,
)
from vinekv.kvstore.spill_checks import check_finite, check_token_ids
from vinekv.kvstore.spill_queue import SpillQueue
from vinekv.kvstore.state import CachedState, EncodedState
from vinekv.kvstore.tensorstore_backend import group_json


@dataclasses.dataclass(frozen=True)
class Spill:
    """One trajectory accepted at the door, waiting for a writer thread."""

    run: str
    trajectory_id: str
    state: CachedState | EncodedState
    prompt_len: int
    fields: dict[str, Any]


def checked_spill(
    codec: KVCodec, run: Any, trajectory_id: Any, state: Any, prompt_len: Any, fields: dict[str, Any]
) -> Spill:
    """The `Spill` of `SnapshotStore.spill`'s arguments, or ValueError/TypeError naming what is
    wrong: names, the state's type and batch, ``prompt_len``, reserved field names, a state
    encoded with another codec, token ids outside the vocabulary, non-finite KV, fields that are
    not JSON."""
    run, tid = check_name("run", run), check_name("trajectory_id", trajectory_id)
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
        if state.codec != codec.spec():
            raise ValueError(f"state was encoded with codec {state.codec['name']!r}, the store uses {codec!r}")
        if state.prompt_len != int(prompt_len):
            raise ValueError(f"prompt_len {prompt_len} != the {state.prompt_len} the state was encoded with")
    check_token_ids(state.token_ids, state.layout.vocab_size)
    check_finite(state)
    return Spill(run, tid, state, int(prompt_len), jsonable(fields))


def jsonable(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` with numpy scalars/arrays turned into JSON values; TypeError if impossible."""

    def convert(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"field value {value!r} of type {type(value).__name__} is not JSON-serialisable")

    return json.loads(json.dumps(fields, default=convert))


class NodeWriter:
    """Writes spilled trajectories as nodes, on background threads with a bound on the bytes in
    flight (`SpillQueue`).

    Args:
      backend: where the store is; with ``durability="flush"`` it must have `GroupCommit`.
      codec, chunk_tokens: how new nodes are stored.
      durability: ``"trajectory"`` (commit each node as it is written) or ``"flush"``.
      record_layout: records the first spill's layout in the root, once, before any node.
      max_inflight_bytes, write_concurrency: the queue's byte budget and writer threads.
    """

    def __init__(
        self,
        backend: Backend,
        codec: KVCodec,
        chunk_tokens: int,
        durability: str,
        record_layout: Callable[[], None],
        max_inflight_bytes: int,
        write_concurrency: int,
    ):
        if durability == "flush" and not isinstance(backend, GroupCommit):
            raise ValueError("durability='flush' needs a local store (staging and rename); use 'trajectory'")
        self._backend = backend
        self._codec = codec
        self._chunk_tokens = chunk_tokens
        self._durability = durability
        self._record_layout = record_layout
        self._lock = threading.Lock()
        self._prompt_locks: dict[str, threading.Lock] = {}
        self._staged: list[tuple[str, str, str | None]] = []  # (staging, final, requires) for the group commit
        self._staged_keys: set[str] = set()
        self._shared: set[str] = set()  # content-addressed prompt prefixes (another writer may commit them too)
        self.unflushed = 0  # trajectories spilled since the last flush
        self.queue = SpillQueue(
            self._write_trajectory,
            max_inflight_bytes,
            write_concurrency,
            describe=lambda item: f"trajectory {item.trajectory_id!r} of run {item.run!r}",
        )

    def submit(self, spill: Spill) -> None:
        """Queues ``spill`` (blocks while the byte budget is spent); `FileExistsError` if the
        trajectory is already stored or queued."""
        prefix = trajectory_prefix(spill.run, spill.trajectory_id)
        exists = FileExistsError(f"trajectory {spill.trajectory_id!r} of run {spill.run!r} is already in the store")
        if prefix in self._staged_keys or self._backend.exists(prefix + "zarr.json"):
            raise exists
        try:
            self.queue.put(prefix, spill, spill.state.nbytes)
        except FileExistsError:
            raise exists from None
        self.unflushed += 1

    def flush(self) -> None:
        """Waits until every queued trajectory is written and committed (with ``"flush"``: commits
        the staged ones, with one round of fsyncs); raises the first write error."""
        try:
            self.queue.drain()
        finally:
            self._commit_staged()
        self.unflushed = 0

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

    def _write_trajectory(self, item: Spill) -> None:
        try:
            self._write_nodes(item)
        except MissingEntryError as err:  # the run's folder went away between `_ensure_run` and a commit
            raise MissingEntryError(
                f"run {item.run!r} was deleted while trajectory {item.trajectory_id!r} was being written: "
                f"not stored ({err})"
            ) from err

    def _write_nodes(self, item: Spill) -> None:
        state, plen = item.state, item.prompt_len
        with self._lock:  # writers create the root layout and a run's groups once
            self._record_layout()
            generation = self._ensure_run(item.run)
        tokens = state.token_ids[0]
        codec_spec, layout = self._codec.spec(), state.layout
        prompt_codes = _codes(self._codec, state, 0, plen)
        key = prompt_content_key(tokens[:plen], state.fingerprint, layout.to_dict(), codec_spec, prompt_codes)
        prompt_at = prompt_prefix(item.run, key)
        with self._lock:
            prompt_lock = self._prompt_locks.setdefault(prompt_at, threading.Lock())
            self._shared.add(prompt_at)
        with prompt_lock:  # trajectories of one prompt in flight together write it once
            if prompt_at not in self._staged_keys and not self._backend.exists(prompt_at + "zarr.json"):
                prompt = PromptNode(
                    length=plen,
                    token_ids=tuple(tokens[:plen].tolist()),
                    fingerprint=state.fingerprint,
                    layout=layout,
                    codec=codec_spec,
                    identity=NodeIdentity(prompt_at, generation),
                )
                with contextlib.suppress(FileExistsError):  # another writer committed the same content first
                    self._write_node(prompt_at, prompt_codes, prompt)
        at = trajectory_prefix(item.run, item.trajectory_id)
        trajectory = TrajectoryNode(
            prompt=key,
            prompt_len=plen,
            length=state.position,
            response_token_ids=tuple(tokens[plen:].tolist()),
            fields=item.fields,
            fingerprint=state.fingerprint,
            layout=layout,
            codec=codec_spec,
            identity=NodeIdentity(at, generation),
        )
        self._write_node(at, _codes(self._codec, state, plen, None), trajectory, requires=prompt_at)

    def _write_node(
        self,
        final_prefix: str,
        codes: dict[str, StoredArray] | None,
        node: PromptNode | TrajectoryNode,
        requires: str | None = None,
    ) -> None:
        """Writes a node's stored arrays (None: no tokens) and its sealed attributes, committed
        atomically now (``durability="trajectory"``) or staged for the next flush."""
        staging = self._backend.staging_prefix(final_prefix)
        futures = []
        try:
            for name, stored in (codes or {}).items():  # appended one by one: each started write is awaited below
                attributes = {"vinekv": {"codec": self._codec.spec(), "array": name, "token_group": stored.token_group}}
                chunk_entries = self._chunk_tokens // stored.token_group
                futures.append(
                    self._backend.write_array(
                        staging + name, stored.data, stored.dims, chunk_entries, self._codec.zstd_level, attributes
                    )
                )
            for future in futures:
                future.result()
            node = dataclasses.replace(
                node,
                arrays={n: json_digest(self._backend.read_json(f"{staging}{n}/zarr.json")) for n in codes or {}},
                chunk_hashes={
                    n: chunk_hashes(stored.data, self._chunk_tokens // stored.token_group)
                    for n, stored in (codes or {}).items()
                },
                data=self._backend.data_path(staging, final_prefix),
            )
            sealed = {"vinekv": seal(node.to_attrs())}
            if self._durability == "flush":
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
        prefix = run_prefix(run)
        attrs = read_sealed(self._backend, prefix + "zarr.json")
        if attrs is None:
            created = RunNode(uuid.uuid4().hex, time.time())
            groups = {f"{sub}/zarr.json": group_json({"vinekv": seal({"kind": sub})}) for sub in NODE_GROUPS}
            if self._backend.create_group(prefix, {"vinekv": seal(created.to_attrs())}, groups):
                return created.generation
            attrs = read_sealed(self._backend, prefix + "zarr.json") or {}  # a racing writer created it first
        return attrs.get("generation")


def update_fields(backend: Backend, run: str, tid: str, fields: dict[str, Any], check: Callable) -> None:
    """Merges ``fields`` into a committed trajectory's fields in one atomic metadata update
    (serialised with other writers'); ``check(attrs, where)`` gives the node of current attrs
    or raises. `MissingEntryError` if there is no such trajectory."""
    _merge_fields(backend, trajectory_prefix(run, tid), f"no trajectory {tid!r} in run {run!r}", check, fields)


def update_run_fields(backend: Backend, run: str, fields: dict[str, Any]) -> None:
    """Merges ``fields`` into a run's fields in one atomic metadata update (serialised with other
    writers'); `MissingEntryError` if there is no such run. The generation stays."""
    _merge_fields(backend, run_prefix(run), f"no run {run!r} in the store", RunNode.from_attrs, fields)


def _merge_fields(backend: Backend, prefix: str, missing: str, node_of: Callable, fields: dict[str, Any]) -> None:
    """One compare-and-swap of the node at ``prefix``: its ``fields`` merged with ``fields`` and
    sealed again; ``node_of(attrs, where)`` reads the current node (``missing``: the error if none)."""
    key = prefix + "zarr.json"
    where = backend.location(key)

    def merge(document: dict[str, Any] | None) -> bytes:
        if document is None:
            raise MissingEntryError(missing)
        node = node_of(check_sealed(group_attrs(document, where), where), where)
        merged = dataclasses.replace(node, fields={**node.fields, **fields})
        return group_json({"vinekv": seal(merged.to_attrs())})

    backend.update_json(key, merge)


def _codes(codec: KVCodec, state: CachedState | EncodedState, lo: int, hi: int | None) -> dict[str, StoredArray] | None:
    """Stored arrays of tokens ``[lo, hi)`` (``hi`` None: to the end) of a spilled state, which
    is either the prompt (``lo == 0``) or the response; None when the part has no tokens."""
    if isinstance(state, EncodedState):
        tokens = state.prompt_len if lo == 0 else state.position - state.prompt_len
        return (state.prompt if lo == 0 else state.response) if tokens else None
    keys = state.keys[:, 0, lo:hi]
    return codec.encode(keys, state.values[:, 0, lo:hi]) if keys.shape[1] else None


_OPEN_WRITERS: weakref.WeakSet[Any] = weakref.WeakSet()  # stores open for writing, closed at exit
_EXIT = threading.Event()  # set when the exit hook runs: no store may be opened for writing after it


def close_at_exit(store: Any) -> None:
    """Registers ``store`` (anything with ``_close_at_exit``) to be closed by the exit hook."""
    _OPEN_WRITERS.add(store)


def exit_started() -> bool:
    """Whether the exit hook has run (a store opened for writing now would never be closed)."""
    return _EXIT.is_set()


def _close_open_writers() -> None:
    """Commits what stores left open at exit had queued, instead of losing it with the daemon
    writer threads (and aborting in TensorStore's threads as the interpreter goes down)."""
    _EXIT.set()
    for store in list(_OPEN_WRITERS):
        store._close_at_exit()


# Threading's exit hooks run before `atexit`'s, last registered first; concurrent.futures' hook
# (imported above: registered earlier) stops its executors, which a commit still needs, so it
# must run after this one.
getattr(threading, "_register_atexit", atexit.register)(_close_open_writers)
