"""Valuation: trajectories + a snapshot source -> branches -> rewards -> MC values (`MCRecord`).

The one loop behind every cache strategy: `value_batches` plans each trajectory's states
(`plan_trajectory`), reads the longest prefix a state needs from a `SnapshotSource` once (every
state is a prefix of it; the next batch is read while this one decodes), values a batch's states
together (`value_trajectories`: equal states sampled once) and returns each trajectory's
`MCRecord` and `StateValues`. Sources: snapshots held in memory (`MemorySource`) or a stored run
(`StoreSource`). `vinekv.replay.branch_replay.replay_run` feeds it a stored run's trajectories and
writes the records back; `vinekv.trainer.value_estimation` feeds it a batch of rollouts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np

from vinekv.kvstore.state import CachedState
from vinekv.kvstore.store import SnapshotStore
from vinekv.replay.config import ReplayConfig
from vinekv.replay.engines import BranchEngine
from vinekv.replay.rewards import RewardFn, score
from vinekv.replay.sampler import generate_branches
from vinekv.replay.steps import Splitter, content_length, lite_anchors, step_starts, valued_states
from vinekv.replay.text import special_ids, text_offsets
from vinekv.replay.values import MCRecord, MCStats, branch_returns, branches_wanted, mc_values, ragged


def trajectory_states(
    response_ids: Sequence[int],
    tokenizer: Any,
    config: ReplayConfig,
    splitter: Splitter | None = None,
    entropy: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(positions [S], valued [S] bool)``: a response's states and which of them get branches.

    Full mode: the step starts of the response without its trailing special tokens (a final EOS
    belongs to the last step), valued per ``config.state_selection`` under ``config.max_states``
    (``entropy``: the policy's next-token entropy at each response position, for the
    ``entropy`` rule). Lite: the anchors, all valued. No state lies at or after the first
    trailing special token (a response of special tokens only keeps the state at 0).
    """
    n = max(1, content_length(response_ids, special_ids(tokenizer)))
    if config.mode == "lite":
        anchors = lite_anchors(n, config.lite_anchor_stride, config.lite_quartiles)
        return anchors, np.ones(len(anchors), bool)
    text, offsets = text_offsets(tokenizer, response_ids[:n])
    starts = step_starts(text, offsets, config.delimiter, splitter)
    scores = None if entropy is None else np.asarray(entropy, np.float64)[starts]
    return starts, valued_states(len(starts), config.max_states, config.state_selection, scores)


def select_states(
    response_ids: Sequence[int],
    tokenizer: Any,
    config: ReplayConfig,
    splitter: Splitter | None = None,
    entropy: Sequence[float] | None = None,
) -> np.ndarray:
    """Response-token positions of the states to branch from (the valued ones of `trajectory_states`)."""
    starts, valued = trajectory_states(response_ids, tokenizer, config, splitter, entropy)
    return starts[valued]


@dataclasses.dataclass(frozen=True)
class TrajectoryPlan:
    """What to value in one trajectory.

    Attributes:
      positions: ``[S]`` response positions of all its states (`trajectory_states`).
      valued: ``[S]`` bool, the states that get branches.
      prior: ``[S]`` returns sampled earlier under the same settings (empty where none).
      prior_tokens: branch tokens of those earlier returns.
    """

    positions: np.ndarray
    valued: np.ndarray
    prior: tuple[tuple[float, ...], ...]
    prior_tokens: int = 0

    def wanted(self, config: ReplayConfig) -> np.ndarray:
        """``[S]`` branches each state should have after the next round (0 where not valued)."""
        wanted = branches_wanted(mc_values(ragged(self.prior)), config.branches, config.branch_cap, config.adaptive_ci)
        return np.where(self.valued, wanted, 0)

    def needed(self, config: ReplayConfig) -> np.ndarray:
        """Indices of the states whose next round samples branches (their snapshots are read)."""
        counts = np.asarray([len(r) for r in self.prior])
        return np.flatnonzero(self.wanted(config) > counts)


def plan_trajectory(
    response_ids: Sequence[int],
    tokenizer: Any,
    config: ReplayConfig,
    *,
    splitter: Splitter | None = None,
    entropy: Sequence[float] | None = None,
    record: MCRecord | None = None,
) -> TrajectoryPlan:
    """The states of a response, with the returns of ``record`` when it holds these settings'."""
    positions, valued = trajectory_states(response_ids, tokenizer, config, splitter, entropy)
    reuse = (
        record is not None and record.config == config.digest() and np.array_equal(record.response_positions, positions)
    )
    prior = record.returns if reuse else tuple(() for _ in positions)
    return TrajectoryPlan(positions, valued, prior, record.branch_tokens if reuse else 0)


@dataclasses.dataclass
class StateValues:
    """MC values of one trajectory's states.

    Attributes:
      returns: ``[S]`` per state, the returns of all its branches (earlier ones first).
      new_branches, new_tokens, unfinished: branches this call added to its states, their
        tokens, and how many were cut off by their budget; a state shared with other
        trajectories counts in each (what valuing this trajectory alone costs).
      seconds: wall time of ``decode`` and ``score`` (a call's time split evenly).
      sampled: ``(states, branches, tokens, unfinished)`` this call actually sampled for the
        states this trajectory owns (the first trajectory holding a state owns it): summed over
        a call's trajectories, what was decoded.
    """

    returns: tuple[tuple[float, ...], ...]
    new_branches: int
    new_tokens: int
    unfinished: int
    seconds: dict[str, float]
    sampled: tuple[int, int, int, int] = (0, 0, 0, 0)

    @property
    def stats(self) -> MCStats:
        """`MCStats` over the ``[S]`` states (NaN where a state has no branch)."""
        return mc_values(ragged(self.returns))


def score_completions(
    reward_fns: RewardFn | Sequence[RewardFn],
    tokenizer: Any,
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    fields: dict[str, Any] | None = None,
) -> np.ndarray:
    """Rewards ``[n]`` of completions (token ids) of one prompt, decoded without special tokens.

    Rollouts and branches are scored through this one function, so both see the same text.
    """
    prompt = tokenizer.decode(list(map(int, prompt_ids)), skip_special_tokens=True)
    texts = tokenizer.batch_decode([list(map(int, c)) for c in completions], skip_special_tokens=True)
    return score(reward_fns, [prompt] * len(texts), texts, [fields or {}] * len(texts))


@dataclasses.dataclass(frozen=True)
class ValueRequest:
    """One trajectory's states to value (`value_trajectories`).

    Attributes:
      response_ids: ``[T]`` the trajectory's response tokens.
      plan: its states and the returns they already have.
      states: response position b -> snapshot of the prompt plus ``response[:b]``, for every
        state in ``plan.needed(config)``.
      fields: the task fields its reward functions receive (its dataset row).
    """

    response_ids: Sequence[int]
    plan: TrajectoryPlan
    states: Mapping[int, CachedState]
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)


def _field_json(value: Any) -> Any:
    """JSON stand-in of a task field value json cannot encode (arrays in full, else its repr)."""
    return value.tolist() if hasattr(value, "tolist") else repr(value)


def state_key(prefix_ids: np.ndarray) -> int:
    """32-bit id of a state for its branch keys: a hash of its tokens (prompt + response prefix)
    alone, so equal states draw equal branches whatever trajectory, batch or process values them."""
    data = np.ascontiguousarray(prefix_ids, dtype=np.int32).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "little")


def value_trajectories(
    model: Any,
    tokenizer: Any,
    reward_fns: RewardFn | Sequence[RewardFn],
    config: ReplayConfig,
    requests: Sequence[ValueRequest],
    engine: BranchEngine | None = None,
) -> list[StateValues]:
    """Samples the branches every request's ``plan`` still lacks and folds all returns into MC values.

    States are valued once per distinct ``(prompt + response prefix, task fields, earlier
    returns)``: the prompt state of a group's rollouts, and states after equal leading steps,
    share one set of branches, and their returns go to every trajectory holding them. Branch i
    of a state at response position b is keyed by ``(config.seed, state_key(prefix), b, i)``,
    so a state's returns do not depend on which other states are valued with it. Each round
    (adaptive K) decodes all distinct states that need branches in one `generate_branches` call
    per branch count; completions ``response[:b] ++ branch`` are scored against the prompt with
    the owner's fields. `StateValues` counts each trajectory's branches as if valued alone, and
    separately what was sampled (at the first trajectory holding a state).
    """
    rows = [[list(r) for r in req.plan.prior] for req in requests]
    seconds = {"decode": 0.0, "score": 0.0}
    held = np.zeros((len(requests), 3), np.int64)  # branches, tokens, unfinished added to each one's states
    sampled = np.zeros((len(requests), 3), np.int64)  # branches, tokens, unfinished sampled at owners
    owned: list[set[int]] = [set() for _ in requests]  # the states each request owns (over all rounds)
    while True:
        # state identity -> (branches to add, its holders [(request, state index)]; the first owns it)
        distinct: dict[tuple, tuple[int, list[tuple[int, int]]]] = {}
        for r, req in enumerate(requests):
            current = TrajectoryPlan(req.plan.positions, req.plan.valued, tuple(map(tuple, rows[r])))
            more = current.wanted(config) - np.array([len(x) for x in rows[r]], np.int64)
            for j in current.needed(config):
                b = int(req.plan.positions[j])
                if b not in req.states:
                    raise ValueError(f"no snapshot given for the state at response position {b} (request {r})")
                snap = req.states[b]
                identity = (
                    snap.token_ids[0, : snap.position].tobytes(),
                    b,
                    json.dumps(req.fields, sort_keys=True, default=_field_json),
                    tuple(rows[r][j]),
                )
                distinct.setdefault(identity, (int(more[j]), []))[1].append((r, int(j)))
        if not distinct:
            break
        for n in sorted({n for n, _ in distinct.values()}):  # one call per branch count (usually one)
            group = [holders for more, holders in distinct.values() if more == n]
            # earliest states first: a decode batch runs until its longest branch ends, so states
            # with similar remaining budgets share batches (the rows' keys make order irrelevant)
            group.sort(key=lambda holders: int(requests[holders[0][0]].plan.positions[holders[0][1]]))
            owners = [holders[0] for holders in group]
            positions = np.array([int(requests[r].plan.positions[j]) for r, j in owners])
            snaps = [requests[r].states[int(b)] for (r, _), b in zip(owners, positions, strict=True)]
            start = time.perf_counter()
            branches = generate_branches(
                model,
                snaps,
                config.sampling_params(n),
                engine=engine or config.engine,
                seed=config.seed,
                tokenizer=tokenizer,
                state_keys=[
                    (state_key(s.token_ids[0, : s.position]), int(b)) for s, b in zip(snaps, positions, strict=True)
                ],
                max_rows=config.max_rows,
                max_tokens=config.branch_budgets(positions),
                first_branch=[len(rows[r][j]) for r, j in owners],
                sampler=config.sampler,
            )
            seconds["decode"] += time.perf_counter() - start
            start = time.perf_counter()
            by_owner: dict[int, list[int]] = {}  # request -> the states of this call it owns
            for k, (r, _) in enumerate(owners):
                by_owner.setdefault(r, []).append(k)
            for r, ks in by_owner.items():  # one reward call per trajectory, as for its rollouts
                snap, response = snaps[ks[0]], list(requests[r].response_ids)
                completions = [
                    response[: int(positions[k])] + branch.tolist() for k in ks for branch in branches[k].tokens
                ]
                prompt = snap.token_ids[0, : snap.position - int(positions[ks[0]])]
                rewards = score_completions(reward_fns, tokenizer, prompt, completions, requests[r].fields)
                for k, state_rewards in zip(ks, np.split(rewards, len(ks)), strict=True):
                    state_branches = branches[k]
                    returns = branch_returns(state_rewards, state_branches.finished, config.unfinished_reward).tolist()
                    cost = (len(returns), int(state_branches.lengths.sum()), int((~state_branches.finished).sum()))
                    sampled[r] += cost
                    owned[r].add(owners[k][1])
                    for holder_r, holder_j in group[k]:
                        rows[holder_r][holder_j].extend(returns)
                        held[holder_r] += cost
            seconds["score"] += time.perf_counter() - start
    share = {name: total / max(len(requests), 1) for name, total in seconds.items()}
    return [
        StateValues(tuple(map(tuple, rows[r])), *map(int, held[r]), dict(share), (len(owned[r]), *map(int, sampled[r])))
        for r in range(len(requests))
    ]


def trajectory_record(
    config: ReplayConfig, prompt_len: int, plan: TrajectoryPlan, values: StateValues, policy: str | None = None
) -> MCRecord:
    """The `MCRecord` of a valued trajectory; ``policy``: fingerprint of the policy that sampled it."""
    return MCRecord(
        config=config.digest(),
        mode=config.mode,
        prompt_len=prompt_len,
        response_positions=plan.positions,
        returns=values.returns,
        branch_tokens=plan.prior_tokens + values.new_tokens,
        policy=policy,
    )


class SnapshotSource(Protocol):
    """Where a trajectory's snapshots come from."""

    def read(self, trajectory_id: str, t: int) -> CachedState:
        """The snapshot (batch 1) of positions ``[0, t)`` of trajectory ``trajectory_id``."""


@dataclasses.dataclass(frozen=True)
class MemorySource:
    """Snapshots held in memory: trajectory id -> a snapshot of at least every prefix read."""

    states: Mapping[str, CachedState]

    def read(self, trajectory_id: str, t: int) -> CachedState:
        return self.states[trajectory_id].prefix(t)


@dataclasses.dataclass(frozen=True)
class StoreSource:
    """The snapshots of a stored run, decoded for ``model`` (``fingerprint``: its `policy_fingerprint`);
    another policy's are refused unless ``allow_stale``."""

    store: SnapshotStore
    run: str
    model: Any
    fingerprint: str
    allow_stale: bool = False

    def read(self, trajectory_id: str, t: int) -> CachedState:
        return self.store.read_prefix(
            self.run, trajectory_id, t, model=self.model, allow_stale=self.allow_stale, fingerprint=self.fingerprint
        )


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One trajectory to value (`value_batches`).

    Attributes:
      id: its name in the snapshot source.
      prompt_len: P, its prompt tokens.
      response_ids: ``[T]`` its response tokens.
      fields: the task fields its reward functions receive (its dataset row).
      entropy: ``[T]`` the policy's next-token entropy at each response position (for
        ``state_selection="entropy"``), or None.
      record: earlier values, extended when they hold these settings' returns (else redone).
      policy: fingerprint of the policy valuing it, written into its record; a record that
        keeps ``record``'s returns keeps ``record.policy``.
    """

    id: str
    prompt_len: int
    response_ids: Sequence[int]
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    entropy: Sequence[float] | None = None
    record: MCRecord | None = None
    policy: str | None = None


@dataclasses.dataclass(frozen=True)
class Valued:
    """A valued trajectory: its new `MCRecord`, the `StateValues` this call added and the
    seconds spent planning it and reading its snapshot."""

    trajectory: Trajectory
    record: MCRecord
    values: StateValues
    read_seconds: float


def value_batches(
    model: Any,
    tokenizer: Any,
    reward_fns: RewardFn | Sequence[RewardFn],
    config: ReplayConfig,
    batches: Iterable[Sequence[Trajectory]],
    source: SnapshotSource,
    *,
    splitter: Splitter | None = None,
    engine: BranchEngine | None = None,
) -> Iterator[list[Valued]]:
    """Values ``batches`` one after another, yielding each one's `Valued` (in order) once done.

    A batch's trajectories are valued together (`value_trajectories`). Each trajectory's states
    are read from ``source`` as the prefixes of one read of the longest one a state needs; the
    next batch (taken from ``batches`` lazily) is read in a thread while this one is valued.
    """
    batches = iter(batches)

    def read_next() -> list[tuple[Trajectory, ValueRequest, float]] | None:
        batch = next(batches, None)
        return None if batch is None else [_read(t, source, tokenizer, config, splitter) for t in batch]

    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(read_next)
        while (items := pending.result()) is not None:
            pending = reader.submit(read_next)
            requests = [request for _, request, _ in items]
            valued = value_trajectories(model, tokenizer, reward_fns, config, requests, engine)
            yield [
                Valued(t, trajectory_record(config, t.prompt_len, r.plan, values, _policy(t, r.plan)), values, seconds)
                for (t, r, seconds), values in zip(items, valued, strict=True)
            ]


def _read(
    trajectory: Trajectory, source: SnapshotSource, tokenizer: Any, config: ReplayConfig, splitter: Splitter | None
) -> tuple[Trajectory, ValueRequest, float]:
    """``(trajectory, its ValueRequest, seconds)``: its plan and the snapshots of the states it needs."""
    start = time.perf_counter()
    plan = plan_trajectory(
        trajectory.response_ids,
        tokenizer,
        config,
        splitter=splitter,
        entropy=trajectory.entropy,
        record=trajectory.record,
    )
    needed = [int(plan.positions[i]) for i in plan.needed(config)]
    states = {}
    if needed:  # one read of the longest prefix serves every state: each is a prefix of it
        longest = source.read(trajectory.id, trajectory.prompt_len + max(needed))
        states = {b: longest.prefix(trajectory.prompt_len + b) for b in needed}
    request = ValueRequest(trajectory.response_ids, plan, states, trajectory.fields)
    return trajectory, request, time.perf_counter() - start


def _policy(trajectory: Trajectory, plan: TrajectoryPlan) -> str | None:
    """The policy a trajectory's new record is attributed to: its earlier record's when the
    returns of that one are kept, else the valuing one."""
    record = trajectory.record
    return record.policy if record is not None and any(plan.prior) else trajectory.policy
