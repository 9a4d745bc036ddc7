"""The branch-engine interface: K continuations of each KV snapshot, however they are decoded.

An engine is started once (compiled programs, page pools), asked to ``expand`` batches of
snapshots any number of times, and closed; it is a context manager. What every engine shares:
the `Branches` it returns, the `BranchSampling` it is given, and how a branch ends.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from vinekv.kvstore.state import CachedState
from vinekv.replay.decode import Sampling


@dataclasses.dataclass
class Branches:
    """K continuations of one state.

    Attributes:
      tokens: K int32 arrays; a finished branch ends with its EOS/stop token.
      lengths: ``[K]`` tokens per branch.
      finish_reasons: ``"eos"``, ``"stop"`` (stop token id or stop string) or ``"length"``.
      logprobs: K float32 arrays, the log-prob of each sampled token under the sampling
        distribution (see `vinekv.replay.sample_tokens`); None from engines that do not report them
        (eSurge's scheduler returns no sampled-token log-probs).
    """

    tokens: list[np.ndarray]
    lengths: np.ndarray
    finish_reasons: list[str]
    logprobs: list[np.ndarray] | None

    @property
    def finished(self) -> np.ndarray:
        """``[K]`` bool: the branch ended by EOS or a stop condition, not the token budget."""
        return np.array([r != "length" for r in self.finish_reasons])


@dataclasses.dataclass(frozen=True)
class BranchSampling:
    """How the K branches of every state are drawn and where they end.

    Attributes:
      k: branches per state.
      temperature: 0 is greedy.
      top_k: 0 is off.
      top_p: 1 is off.
      sampler: whose truncation order (``"generate"`` or ``"esurge"``, `vinekv.replay.truncated_logits`).
      eos_ids: token ids that end a branch as ``"eos"``.
      stop_ids: token ids that end a branch as ``"stop"``.
      stop_strings: texts that end a branch as ``"stop"`` (need a tokenizer).
    """

    k: int
    temperature: float
    top_k: int
    top_p: float
    sampler: str
    eos_ids: frozenset[int]
    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...] = ()

    @property
    def sampling(self) -> Sampling:
        """The dense decode loop's static sampling settings."""
        return Sampling(self.temperature, self.top_k, self.top_p, self.sampler)

    def end_reason(self, token: int) -> str | None:
        """``"eos"`` / ``"stop"`` when ``token`` ends a branch by its id, else None."""
        return "eos" if token in self.eos_ids else "stop" if token in self.stop_ids else None


class BranchEngine(abc.ABC):
    """Expands snapshots into branches. Use as ``with engine: engine.expand(...)``."""

    name: str

    def start(self) -> BranchEngine:
        """Prepares the engine (idempotent); returns it."""
        return self

    @abc.abstractmethod
    def close(self) -> None:
        """Releases what `start` acquired (idempotent)."""

    @abc.abstractmethod
    def update_model(self, model: Any) -> None:
        """Uses ``model``'s weights from now on (a policy update between batches)."""

    @abc.abstractmethod
    def expand(
        self,
        states: Sequence[CachedState],
        sampling: BranchSampling,
        keys: np.ndarray,
        budgets: np.ndarray,
        tokenizer: Any = None,
    ) -> list[Branches]:
        """``sampling.k`` branches of each single-row state.

        Args:
          states: single-row snapshots, positions >= 2.
          sampling: how branches are drawn and where they end.
          keys: ``[len(states) * k, 2]`` PRNG keys, state by state (`vinekv.replay.branch_keys`).
          budgets: ``[len(states)]`` most tokens per branch of each state.
          tokenizer: for ``sampling.stop_strings``.

        Returns:
          one `Branches` per state, in order.
        """

    def __enter__(self) -> BranchEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def cut_at_stop_strings(
    tokens: np.ndarray, length: int, reason: str, sampling: BranchSampling, tokenizer: Any
) -> tuple[int, str]:
    """``(length, reason)`` of a branch after the first stop string in its first ``length``
    tokens (the branch ends at the token that completes it), or unchanged."""
    if not sampling.stop_strings:
        return length, reason
    longest = max(len(s) for s in sampling.stop_strings)
    for i in range(1, length + 1):
        window = tokens[max(0, i - longest - 8) : i].tolist()
        tail = tokenizer.decode(window, skip_special_tokens=True)
        before = tokenizer.decode(window[:-1], skip_special_tokens=True)
        if any(s in tail and s not in before for s in sampling.stop_strings):
            return i, "stop"
    return length, reason
