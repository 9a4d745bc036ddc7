"""Reading a store: nodes, checked and cached, and prefix snapshots ``[0, t)`` as `CachedState`.

A trajectory's snapshot at ``t`` is tokens ``[0, min(t, prompt_len))`` of its prompt node
followed by tokens ``[0, t - prompt_len)`` of its own node. A `ReadPlan` names those parts; its
reads are started (asynchronously, TensorStore decompresses and verifies crc32c on its own
threads) before any is awaited, so many plans overlap.

`NodeReader` takes no model: whoever consumes the snapshots checks their policy and layout
(`SnapshotStore.read_prefixes` does). A handle caches what never changes while a run's
generation does not, and checks the generation once per read call: a run deleted and written
again by another process is read anew, whole.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from vinekv.kvstore.backends.interface import Backend
from vinekv.kvstore.codecs import KVCodec
from vinekv.kvstore.codecs.base import token_entries
from vinekv.kvstore.errors import ContentMismatchError, CorruptChunkError, CorruptMetadataError, MissingEntryError
from vinekv.kvstore.integrity import check_sealed, chunk_hashes, group_attrs, json_digest
from vinekv.kvstore.schema import (
    NODE_GROUPS,
    PromptNode,
    RunNode,
    TrajectoryNode,
    node_from_attrs,
    prompt_prefix,
    run_of,
    run_prefix,
    trajectory_prefix,
)
from vinekv.kvstore.state import CachedState, KVLayout


@dataclasses.dataclass(frozen=True)
class ReadPart:
    """Tokens ``[0, stop)`` of one node, which sit at ``[offset, offset + stop)`` of the trajectory.

    Attributes:
      prefix: the node's key prefix in the store.
      offset: position of the node's first token in the trajectory.
      stop: tokens of the node to read.
      codec: the codec the node was written with.
      arrays: the node's opened TensorStore arrays, by name.
      location: where the node is (a folder path or URL), for error messages.
    """

    prefix: str
    offset: int
    stop: int
    codec: KVCodec
    arrays: dict[str, Any]
    location: str
    chunk_tokens: int
    hashes: dict[str, list[str]] | None = None

    def _entries(self, name: str) -> tuple[int, int]:
        """(entries covering ``[0, stop)``, entries read: up to the end of their last chunk)."""
        group = self.codec.token_groups()[name]
        needed, per_chunk = token_entries(self.stop, group), self.chunk_tokens // group
        return needed, min(-(-needed // per_chunk) * per_chunk, self.arrays[name].shape[2])

    def start(self) -> dict[str, Any]:
        """Starts the reads of every array's whole chunks covering ``[0, stop)``; futures by name."""
        return {name: arr[:, :, : self._entries(name)[1]].read() for name, arr in self.arrays.items()}

    def result(self, futures: dict[str, Any], what: str) -> dict[str, np.ndarray]:
        """The codes of ``[0, stop)``, or `CorruptChunkError` naming ``what``, the array and the bad
        positions: a chunk that fails its checksum or is missing, or (`ContentMismatchError`) one
        whose bytes are not those the node recorded a hash of."""
        codes = {}
        for name, future in futures.items():
            try:
                whole = future.result()
            except ValueError as err:
                lo, hi = self.offset, self.offset + self.stop
                group = self.codec.token_groups()[name]
                bad = locate_corruption(self.arrays[name], token_entries(self.stop, group), self.chunk_tokens // group)
                where = ", ".join(f"[{lo + a * group}, {lo + min(b * group, self.stop)})" for a, b in bad)
                array = f"{self.location}{name}"
                problem = (
                    "has missing chunks (a deleted or truncated file)" if "NOT_FOUND" in str(err) else "is corrupt"
                )
                raise CorruptChunkError(
                    f"{what}: stored array {array} {problem} at positions {where or f'[{lo}, {hi})'} "
                    f"(read of [{lo}, {hi})): {err}"
                ) from err
            if self.hashes is not None:
                self._check_hashes(name, whole, what)
            codes[name] = whole[:, :, : self._entries(name)[0]]
        return codes

    def _check_hashes(self, name: str, whole: np.ndarray, what: str) -> None:
        group = self.codec.token_groups()[name]
        per_chunk = self.chunk_tokens // group
        recorded = self.hashes.get(name, [])
        for i, digest in enumerate(chunk_hashes(whole, per_chunk)):
            if i >= len(recorded) or digest != recorded[i]:
                lo, hi = self.offset + i * per_chunk * group, self.offset + (i + 1) * per_chunk * group
                raise ContentMismatchError(
                    f"{what}: stored array {self.location}{name}, chunk of positions [{lo}, {hi}), does not match "
                    "the content hash its node recorded (a file of another node, or of a deleted generation)"
                )


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """Everything needed to read the snapshot ``[0, t)`` of one stored trajectory.

    Attributes:
      run, trajectory_id, t: the request.
      node: the trajectory node.
      parts: the prompt part, then (when ``t > prompt_len``) the response part.
      token_ids: the trajectory's first ``t`` token ids.
    """

    run: str
    trajectory_id: str
    t: int
    node: TrajectoryNode
    parts: tuple[ReadPart, ...]
    token_ids: np.ndarray

    @property
    def what(self) -> str:
        return f"run {self.run!r} trajectory {self.trajectory_id!r}"


class NodeReader:
    """The nodes and snapshots of one store, as one handle sees them.

    Args:
      backend: where the store is.
      chunk_tokens: the store's tokens per chunk.
      layout: the store's recorded layout (read again by the callee when none is recorded yet).
      listing: the store's runs, named when a run is missing.
    """

    def __init__(
        self,
        backend: Backend,
        chunk_tokens: int,
        layout: Callable[[], KVLayout | None],
        listing: Callable[[], list[str]],
    ):
        self._backend = backend
        self._listing = listing
        self._chunk_tokens = chunk_tokens
        self._layout = layout
        self._nodes: dict[str, PromptNode | TrajectoryNode] = {}
        self._arrays: dict[str, Any] = {}
        self._runs: dict[str, RunNode] = {}  # runs checked by this handle
        self._lock = threading.Lock()

    # -- runs ------------------------------------------------------------------------------
    def run(self, run: str) -> RunNode:
        """The run as this handle first read it; `MissingEntryError` if it is not in the store."""
        if run not in self._runs:
            attrs = read_sealed(self._backend, run_prefix(run) + "zarr.json")
            if attrs is None:
                raise MissingEntryError(f"no run {run!r} in the store (runs: {self._listing()})")
            node = RunNode.from_attrs(attrs, self._backend.location(run_prefix(run) + "zarr.json"))
            for sub in NODE_GROUPS:
                key = f"{run_prefix(run)}{sub}/zarr.json"
                if read_sealed(self._backend, key) is None:
                    raise CorruptMetadataError(f"{self._backend.location(key)} is missing")
            self._runs[run] = node
        return self._runs[run]

    def forget_run(self, run: str) -> None:
        """Drops what this handle cached of ``run`` (metadata, opened arrays)."""
        with self._lock:
            self._runs.pop(run, None)
            self._nodes = {k: v for k, v in self._nodes.items() if not k.startswith(run_prefix(run))}
            self._arrays = {k: v for k, v in self._arrays.items() if not k.startswith(run_prefix(run))}

    def forget_changed_runs(self, runs: Iterable[str]) -> bool:
        """Forgets each of ``runs`` whose generation in the store is not the one cached; whether
        any was. Raises `MissingEntryError` for a run deleted since it was cached."""
        changed = False
        for run in runs:
            if run not in self._runs:
                continue
            attrs = read_sealed(self._backend, run_prefix(run) + "zarr.json")
            if attrs is None:
                self.forget_run(run)
                raise MissingEntryError(f"run {run!r} was deleted after this handle read it")
            if attrs.get("generation") != self._runs[run].generation:
                self.forget_run(run)
                changed = True
        return changed

    # -- nodes -----------------------------------------------------------------------------
    def trajectory(self, run: str, tid: str, fresh: bool = False) -> TrajectoryNode:
        """The trajectory node as this handle first read it (``fresh``: read again)."""
        key = trajectory_prefix(run, tid)
        if fresh:
            self._nodes.pop(key, None)
        if key not in self._nodes:
            attrs = read_sealed(self._backend, key + "zarr.json")
            if attrs is None:
                self.run(run)
                raise MissingEntryError(f"no trajectory {tid!r} in run {run!r}")
            self._cache(run, key, attrs, TrajectoryNode.kind)
        return self._nodes[key]

    def node(self, prefix: str) -> PromptNode | TrajectoryNode:
        """The node at ``prefix``, which a trajectory references (so it must exist)."""
        if prefix not in self._nodes:
            attrs = read_sealed(self._backend, prefix + "zarr.json")
            if attrs is None:
                raise CorruptMetadataError(
                    f"{self._backend.location(prefix + 'zarr.json')} is missing (a node a trajectory references)"
                )
            kind = PromptNode.kind if "/prompts/" in prefix else TrajectoryNode.kind
            self._cache(run_of(prefix), prefix, attrs, kind)
        return self._nodes[prefix]

    def check_node(self, attrs: dict[str, Any], kind: str, where: str) -> PromptNode | TrajectoryNode:
        """The node ``attrs`` describe; its layout must be the store's (every snapshot shares it)."""
        node = node_from_attrs(attrs, kind, where)
        if node.layout != self._layout():
            raise CorruptMetadataError(f"{where}: layout {attrs['layout']} is not the store's {self._layout()}")
        return node

    def check_trajectory(self, attrs: dict[str, Any], where: str) -> TrajectoryNode:
        return self.check_node(attrs, TrajectoryNode.kind, where)

    def _cache(self, run: str, prefix: str, attrs: dict[str, Any], kind: str) -> None:
        """Checks a node (`check_node`, and that it is the one written at ``prefix`` in the run's
        current generation) and caches it. A node of a newer generation than this handle knows
        means the run was deleted and written again: what the handle cached of it is dropped first."""
        where = self._backend.location(prefix + "zarr.json")
        node = self.check_node(attrs, kind, where)
        identity = node.identity  # absent in nodes written before identities were sealed
        if identity is not None:
            if identity.at != prefix:
                raise CorruptMetadataError(
                    f"{where}: this metadata belongs to {identity.at} (a node's files copied over another's)"
                )
            if identity.generation != self.run(run).generation:
                self.forget_run(run)
                if identity.generation != self.run(run).generation:
                    raise CorruptMetadataError(
                        f"{where}: written into generation {identity.generation} of run {run!r}, which was "
                        f"deleted (the run is now generation {self.run(run).generation})"
                    )
        self._nodes[prefix] = node

    def token_ids(self, run: str, tid: str) -> list[int]:
        """All of a stored trajectory's token ids, prompt then response."""
        node = self.trajectory(run, tid)
        return [*self.node(prompt_prefix(run, node.prompt)).token_ids, *node.response_token_ids]

    # -- snapshots -------------------------------------------------------------------------
    def plan(self, run: str, tid: str, t: int) -> ReadPlan:
        """Which stored parts the snapshot ``[0, t)`` needs."""
        node = self.trajectory(run, tid)
        length, plen = node.length, node.prompt_len
        if isinstance(t, bool) or not isinstance(t, int | np.integer) or not 1 <= t <= length:
            raise ValueError(f"t={t!r} outside [1, {length}] for trajectory {tid!r} of run {run!r} ({length} tokens)")
        prompt_at = prompt_prefix(run, node.prompt)
        held = self.node(prompt_at).length
        if held != plen:
            where = self._backend.location(trajectory_prefix(run, tid) + "zarr.json")
            raise CorruptMetadataError(
                f"{where}: prompt_len {plen}, but its prompt node {prompt_at} holds {held} tokens"
            )
        spans = [(prompt_at, 0, min(t, plen))]
        if t > plen:
            spans.append((trajectory_prefix(run, tid), plen, t - plen))
        parts = []
        for prefix, offset, stop in spans:
            part_node = self.node(prefix)
            codec = part_node.kv_codec(self._backend.location(prefix + "zarr.json"))
            arrays = {name: self._array(prefix, name, part_node, codec) for name in codec.array_names}
            location = self._backend.location(prefix)
            parts.append(
                ReadPart(prefix, offset, stop, codec, arrays, location, self._chunk_tokens, part_node.chunk_hashes)
            )
        tokens = np.asarray(self.token_ids(run, tid)[:t], dtype=np.int32)
        return ReadPlan(run, tid, int(t), node, tuple(parts), tokens)

    def read(self, plans: list[ReadPlan], out_dtype: Any = None, on_device: bool = False) -> list[CachedState]:
        """The snapshots of ``plans``, all reads started before any is awaited; keys/values in
        ``out_dtype`` (default: the cache dtype), jax arrays decoded on the device with ``on_device``."""
        started = [[part.start() for part in plan.parts] for plan in plans]
        states = []
        for plan, futures in zip(plans, started, strict=True):
            layout = plan.node.layout
            dtype = out_dtype or np.dtype(layout.dtype)
            blocks = []
            for part, part_futures in zip(plan.parts, futures, strict=True):
                codes = part.result(part_futures, plan.what)
                if on_device:  # padded to whole chunks: one compiled decode per chunk count
                    padded = _pad_to_chunks(codes, part.codec.token_groups(), self._chunk_tokens)
                    blocks.append(part.codec.device_decode(padded, layout.dtype, dtype)[:, :, : part.stop])
                else:
                    blocks.append(part.codec.decode(codes, layout.dtype, dtype))
            xp = _array_module(on_device)
            kv = xp.concatenate(blocks, axis=2) if len(blocks) > 1 else blocks[0]
            out_layout = dataclasses.replace(layout, dtype=np.dtype(dtype).name)
            keys, values = kv[:, 0][:, None], kv[:, 1][:, None]
            states.append(CachedState(keys, values, plan.token_ids[None], out_layout, plan.node.fingerprint))
        return states

    def _array(self, prefix: str, name: str, node: PromptNode | TrajectoryNode, codec: KVCodec) -> Any:
        """A node's stored array, its metadata checked against the digest the node recorded and
        against what ``codec`` (the node's) stores for the store's layout."""
        path = prefix + node.data + name
        if path not in self._arrays:
            where = self._backend.location(path + "/zarr.json")
            expected = node.arrays.get(name)
            if expected is None:
                raise CorruptMetadataError(
                    f"{self._backend.location(prefix + 'zarr.json')}: no record of array {name!r}"
                )
            metadata = self._backend.read_json(path + "/zarr.json")
            if metadata is None:
                raise CorruptMetadataError(f"{where} is missing (array metadata of a committed node)")
            if json_digest(metadata) != expected:
                raise CorruptMetadataError(f"{where}: array metadata does not match the digest its node recorded")
            entries = token_entries(node.stored_tokens, codec.token_groups()[name])
            shape = metadata.get("shape")
            if not isinstance(shape, list) or len(shape) < 3 or shape[2] != entries:
                raise CorruptMetadataError(
                    f"{where}: shape {shape} does not hold the node's {node.stored_tokens} tokens"
                )
            other_axes, dtype = array_geometry(codec, self._layout())[name]
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


def read_sealed(backend: Backend, key: str) -> dict[str, Any] | None:
    """The verified ``attributes.vinekv`` of the group ``zarr.json`` at ``key`` (None if absent)."""
    document = backend.read_json(key)
    where = backend.location(key)
    return None if document is None else check_sealed(group_attrs(document, where), where)


@functools.lru_cache(maxsize=16)
def array_geometry(codec: KVCodec, layout: KVLayout) -> dict[str, tuple[list[int], str]]:
    """Per stored array of ``codec`` for ``layout``: its axes other than the token axis, and its
    dtype (from encoding one token)."""
    one = np.zeros((layout.num_layers, 1, layout.num_kv_heads, layout.head_dim), np.dtype(layout.dtype))
    return {
        name: ([*stored.data.shape[:2], *stored.data.shape[3:]], str(stored.data.dtype))
        for name, stored in codec.encode(one, one).items()
    }


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


def locate_corruption(array: Any, entries: int, chunk_entries: int) -> list[tuple[int, int]]:
    """Entry ranges ``[lo, hi)`` of the inner chunks of ``array[..., :entries]`` that fail to read."""
    bad = []
    for lo in range(0, entries, chunk_entries):
        hi = min(lo + chunk_entries, entries)
        try:
            array[:, :, lo:hi].read().result()
        except ValueError:
            bad.append((lo, hi))
    return bad
