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
from kvstore.errors import CorruptChunkError


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

    def start(self) -> dict[str, Any]:
        """Starts the reads of every array's entries covering ``[0, stop)``; futures by name."""
        groups = self.codec.token_groups()
        return {name: arr[:, :, : token_entries(self.stop, groups[name])].read() for name, arr in self.arrays.items()}

    def result(self, futures: dict[str, Any], what: str, chunk_tokens: int) -> dict[str, np.ndarray]:
        """The codes, or `CorruptChunkError` naming ``what``, the array and the bad positions."""
        codes = {}
        for name, future in futures.items():
            try:
                codes[name] = future.result()
            except ValueError as err:
                lo, hi = self.offset, self.offset + self.stop
                group = self.codec.token_groups()[name]
                bad = locate_corruption(self.arrays[name], token_entries(self.stop, group), chunk_tokens // group)
                where = ", ".join(f"[{lo + a * group}, {lo + min(b * group, self.stop)})" for a, b in bad)
                array = f"{self.location}{name}"
                problem = (
                    "has missing chunks (a deleted or truncated file)" if "NOT_FOUND" in str(err) else "is corrupt"
                )
                raise CorruptChunkError(
                    f"{what}: stored array {array} {problem} at positions {where or f'[{lo}, {hi})'} "
                    f"(read of [{lo}, {hi})): {err}"
                ) from err
        return codes


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
