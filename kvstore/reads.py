"""Prefix reads: which stored chunks a snapshot ``[0, t)`` needs, and turning them into KV.

A trajectory's snapshot at ``t`` is tokens ``[0, min(t, prompt_len))`` of its prompt node
followed by tokens ``[0, t - prompt_len)`` of its own node. A `ReadPlan` names those parts; its
reads are started (asynchronously, TensorStore decompresses and verifies crc32c on its own
threads) before any is awaited, so many plans overlap.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kvstore.codecs import KVCodec
from kvstore.codecs.base import token_entries
from kvstore.errors import ContentMismatchError, CorruptChunkError
from kvstore.integrity import chunk_hashes


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
      info: the trajectory node's attributes.
      parts: the prompt part, then (when ``t > prompt_len``) the response part.
      token_ids: the trajectory's first ``t`` token ids.
    """

    run: str
    trajectory_id: str
    t: int
    info: dict[str, Any]
    parts: tuple[ReadPart, ...]
    token_ids: np.ndarray

    @property
    def what(self) -> str:
        return f"run {self.run!r} trajectory {self.trajectory_id!r}"


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
