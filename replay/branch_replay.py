"""Offline branch replay: a stored run's snapshots -> branches -> rewards -> MC values in the store.

For every trajectory of a run: pick its states (step starts in full mode, anchors in Lite
mode; `trajectory_states`), read the longest prefix a state needs from the store once (every
state is a prefix of it; the next batch's reads overlap this one's decoding), sample K
branches per valued state with `generate_branches` (each within the rollout's remaining token
budget), ``trajectories_per_call`` trajectories together with each distinct state sampled once
(`value_trajectories`: a group's prompt state, equal leading steps), score ``response prefix ++
branch`` with the reward functions, fold returns into MC values, and write them back next to
the snapshot metadata (field ``mc``, a `MCRecord`), atomically per trajectory. Branch i of
a state has its own key, from the state's tokens (`state_key`), not from the trajectory: a
trajectory already valued under the same settings gets only the branches it lacks (more K,
adaptive rounds) and a settled one is skipped, so a killed replay, run again, finishes the rest
and gives the same values as an uninterrupted one. Values sampled by another policy (the
record's ``policy`` fingerprint) are not values of this one: such a trajectory is valued again
from scratch. The valuing itself is `vinekv.replay.valuation.value_batches` (the trainer's in-memory
strategies use it too); this module picks what to value and writes the records.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from vinekv.kvstore.dense_cache import kv_bytes_per_token
from vinekv.kvstore.fingerprint import policy_fingerprint
from vinekv.kvstore.schema import MC_FIELD, TrajectoryNode
from vinekv.kvstore.store import SnapshotStore
from vinekv.replay.config import ReplayConfig
from vinekv.replay.engines import BranchEngine, ESurgeOptions, open_engine
from vinekv.replay.rewards import RewardFn
from vinekv.replay.steps import Splitter
from vinekv.replay.valuation import (  # F401: public here too, as before they moved there
    StateValues,  # noqa: F401
    StoreSource,
    Trajectory,
    TrajectoryPlan,
    Valued,
    ValueRequest,  # noqa: F401
    plan_trajectory,  # noqa: F401
    score_completions,  # noqa: F401
    select_states,  # noqa: F401
    state_key,  # noqa: F401
    trajectory_record,  # noqa: F401
    trajectory_states,  # noqa: F401
    value_batches,
    value_trajectories,  # noqa: F401
)
from vinekv.replay.values import MCRecord

logger = logging.getLogger(__name__)

# Above this share of branches cut off by their budget, a replay warns (values may only say "too short").
TRUNCATION_WARNING = 0.5


@dataclasses.dataclass
class ReplayReport:
    """Counts and seconds (``read``, ``decode``, ``score``) of a replay; ``branches_per_state``
    holds the final K of every state valued (adaptive K varies it). ``states`` counts every
    trajectory's valued states, ``sampled_states`` the distinct ones branches were sampled for
    (equal states of several trajectories share their branches, `value_trajectories`);
    ``branches``, ``unfinished`` and ``branch_tokens`` count what was sampled,
    ``separate_branches`` what valuing every trajectory alone would have sampled. ``stale``: trajectories
    (among ``trajectories``) valued again from scratch because their stored values came from
    another policy. ``records``: trajectory id -> the `MCRecord` written (`replay_run` with
    ``keep_records``)."""

    trajectories: int = 0
    skipped: int = 0
    stale: int = 0
    states: int = 0
    sampled_states: int = 0
    separate_branches: int = 0
    branches: int = 0
    unfinished: int = 0
    branch_tokens: int = 0
    rollout_tokens: int = 0
    branches_per_state: list[int] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: {"read": 0.0, "decode": 0.0, "score": 0.0})
    records: dict[str, MCRecord] = dataclasses.field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.branch_tokens / self.seconds["decode"] if self.seconds["decode"] else 0.0

    def warn_if_mostly_truncated(self, config: ReplayConfig) -> None:
        """Logs a warning when most branches hit their token budget and returned
        ``unfinished_reward`` instead of the task's outcome."""
        if (
            config.unfinished_reward is not None
            and self.branches
            and self.unfinished / self.branches > TRUNCATION_WARNING
        ):
            logger.warning(
                "%d of %d branches (%.0f%%) were cut off by their token budget (max_tokens=%d, horizon=%s) and "
                "returned unfinished_reward=%s: the MC values mostly measure the budget; raise the budget "
                "(vineppo_max_depth / lite_branch_max_len) or check that the policy emits EOS",
                self.unfinished,
                self.branches,
                100 * self.unfinished / self.branches,
                config.max_tokens,
                config.horizon,
                config.unfinished_reward,
            )

    def merge(self, other: ReplayReport) -> None:
        """Adds the counts, per-state K, seconds and records of another replay (e.g. another worker's)."""
        for field in dataclasses.fields(ReplayReport):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if field.name == "seconds":
                for name, seconds in theirs.items():
                    mine[name] = mine.get(name, 0.0) + seconds
            elif isinstance(mine, list):
                mine.extend(theirs)
            elif isinstance(mine, dict):  # records
                mine.update(theirs)
            else:
                setattr(self, field.name, mine + theirs)

    def add(self, valued: Valued) -> None:
        """Counts one valued trajectory (the branches sampled now, not earlier ones)."""
        values = valued.values
        counts = values.stats.count
        self.trajectories += 1
        self.states += int((counts > 0).sum())
        states, branches, tokens, unfinished = values.sampled
        self.sampled_states += states
        self.separate_branches += values.new_branches
        self.branches += branches
        self.unfinished += unfinished
        self.branch_tokens += tokens
        self.rollout_tokens += len(valued.trajectory.response_ids)
        self.branches_per_state.extend(int(c) for c in counts if c > 0)
        self.seconds["read"] += valued.read_seconds
        for name, seconds in values.seconds.items():
            self.seconds[name] += seconds


def replay_run(
    store: SnapshotStore,
    run: str,
    model: Any,
    tokenizer: Any,
    reward_fns: RewardFn | Sequence[RewardFn],
    config: ReplayConfig = ReplayConfig(),  # noqa: B008 (frozen)
    *,
    trajectories: Sequence[str] | None = None,
    splitter: Splitter | None = None,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    allow_stale: bool = False,
    keep_stale_values: bool = False,
    shard: tuple[int, int] | None = None,
    engine: BranchEngine | None = None,
    esurge_options: ESurgeOptions | None = None,
    keep_records: bool = False,
) -> ReplayReport:
    """Computes MC values for the trajectories of ``run`` and writes them into the store.

    ``shard=(i, n)``: only the trajectories `shard_of` puts in shard ``i`` of ``n``, so ``n``
    independent processes (SLURM array tasks, pod hosts) with ``i = 0..n-1`` value the run
    exactly once between them. Branch keys depend on the trajectory, not the worker, so the
    values equal a single process's.

    A trajectory already valued under the same settings gets only the branches it lacks (more
    ``branches``, adaptive rounds), drawn with their own keys: the result is what one run with
    the final settings gives. Returns a `ReplayReport`; with ``metrics_path`` one JSON line per
    trajectory is appended there (states, branches, tokens, MC variance, budget, time split).
    ``vinekv_entropy`` fields (`TrajectoryNode.entropy`) feed ``state_selection="entropy"``.
    ``engine``: a started branch engine; default: ``config.engine`` opened for this run (with
    ``esurge_options``) and closed after. ``keep_records``: the report also holds every record
    written (``report.records``), for a caller that would otherwise read them back.

    Stored values sampled by another policy than ``model`` (`MCRecord.made_by`: the record's
    ``policy``, else the snapshot's fingerprint) are stale: a warning names how many, and they
    are valued again from scratch (counted in ``report.stale``), none of their returns reused.
    ``keep_stale_values``: keep them instead, as values of this policy (skipped when settled,
    extended when not). ``allow_stale``: read snapshots of another policy (else refused).
    """
    ids = list(trajectories) if trajectories is not None else store.trajectories(run)
    if shard is not None:
        index, count = check_shard(shard)
        ids = [tid for tid in ids if shard_of(tid, count) == index]
    digest = config.digest()
    fingerprint = policy_fingerprint(model)
    report = ReplayReport()
    todo, stale = [], set()
    tokens: dict[str, int] = {}  # each trajectory's length, for the batches' KV budget
    for tid in ids:
        node = store.trajectory(run, tid)
        tokens[tid] = node.length
        record = _stored_record(node)
        if record is not None and record.made_by(node.fingerprint) != fingerprint:
            stale.add(tid)
            if not keep_stale_values:
                todo.append(tid)
                continue
        if record is not None and record.config == digest and _settled(record, config):
            report.skipped += 1
        else:
            todo.append(tid)
    if stale:
        logger.warning(
            "%d of %d trajectories of run %r hold MC values sampled by another policy than the model's (%s): %s",
            len(stale),
            len(ids),
            run,
            fingerprint,
            "keeping them (keep_stale_values)" if keep_stale_values else "valuing them again from scratch",
        )
    report.stale = 0 if keep_stale_values else len(stale)
    revalue = set() if keep_stale_values else stale
    metrics = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115
    bar = tqdm(total=len(todo), desc=f"replay {run}", unit="traj", disable=not progress)

    source = StoreSource(store, run, model, fingerprint, allow_stale)

    def describe(tid: str) -> Trajectory:
        node = store.trajectory(run, tid)
        record = None if tid in revalue else _stored_record(node)
        if record is not None:  # its policy made explicit: returns kept keep it (`MCRecord.made_by`)
            record = dataclasses.replace(record, policy=record.made_by(node.fingerprint))
        return Trajectory(
            tid, node.prompt_len, node.response_token_ids, node.task_fields, node.entropy, record, fingerprint
        )

    opened = None
    if engine is None and todo:
        engine = opened = open_engine(
            config.engine, model, tokenizer=tokenizer, max_rows=config.max_rows, esurge_options=esurge_options
        )
    batches = replay_batches([tokens[t] for t in todo], kv_bytes_per_token(model), config)
    described = ([describe(todo[i]) for i in batch] for batch in batches)  # taken in value_batches' reader
    try:
        for valued in value_batches(
            model, tokenizer, reward_fns, config, described, source, splitter=splitter, engine=engine
        ):
            for item in valued:
                tid = item.trajectory.id
                store.annotate(run, tid, **{MC_FIELD: item.record.to_fields()})
                report.add(item)
                if keep_records:
                    report.records[tid] = item.record
                if metrics:
                    metrics.write(json.dumps(_metrics_line(item)) + "\n")
                    metrics.flush()
            bar.update(len(valued))
            bar.set_postfix(states=report.states, branches=report.branches, tok_s=f"{report.tokens_per_second:.0f}")
    finally:
        bar.close()
        if metrics:
            metrics.close()
        if opened is not None:
            opened.close()
    report.warn_if_mostly_truncated(config)
    return report


def replay_batches(lengths: Sequence[int], bytes_per_token: int, config: ReplayConfig) -> list[list[int]]:
    """Consecutive batches of trajectory indices: at most ``config.trajectories_per_call`` each,
    and at most ``config.batch_kv_mb`` MiB of KV (``lengths`` tokens x ``bytes_per_token``),
    at least one trajectory each."""
    budget = config.batch_kv_mb * 2**20
    batches: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        size = n * bytes_per_token
        if not batches or len(batches[-1]) >= config.trajectories_per_call or used + size > budget:
            batches.append([])
            used = 0
        batches[-1].append(i)
        used += size
    return batches


def shard_of(trajectory_id: str, num_shards: int) -> int:
    """The shard (``0 <= shard < num_shards``) of a trajectory id: a hash of the id alone, so the
    split needs no listing order and a trajectory added later keeps everyone's assignment."""
    digest = hashlib.blake2b(str(trajectory_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """``(index, count)`` of a shard, or ValueError naming what is wrong."""
    if not isinstance(shard, tuple | list) or len(shard) != 2:
        raise ValueError(f"shard must be (index, count), got {shard!r}")
    index, count = shard
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
    if not ints or count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need integers with 0 <= index < count")
    return index, count


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/N"`` (e.g. a SLURM array's ``$SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``) as ``(i, N)``."""
    parts = text.split("/")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--shard takes i/N (e.g. 0/4), got {text!r}")
    return check_shard((int(parts[0]), int(parts[1])))


def _stored_record(node: TrajectoryNode) -> MCRecord | None:
    """The trajectory's `MCRecord`, or None when it has none or one in an older format (valued again)."""
    try:
        return MCRecord.of(node)
    except ValueError:
        return None


def _settled(record: MCRecord, config: ReplayConfig) -> bool:
    valued = record.stats.count > 0
    plan = TrajectoryPlan(record.response_positions, valued, record.returns)
    return plan.needed(config).size == 0


def _metrics_line(item: Valued) -> dict[str, Any]:
    """The metrics line (`replay_run`'s ``metrics_path``) of a valued trajectory."""
    values, response_len = item.values, len(item.trajectory.response_ids)
    stats = values.stats
    return {
        "trajectory": item.trajectory.id,
        "states": int((stats.count > 0).sum()),
        "branches": values.new_branches,
        "branches_per_state": stats.count.tolist(),
        "branch_tokens": values.new_tokens,
        "budget_branch_tokens_per_rollout_token": values.new_tokens / max(1, response_len),
        "mc_mean": [None if np.isnan(m) else m for m in stats.mean.tolist()],
        "mc_var_mean": float(np.nanmean(stats.var)) if np.any(stats.count > 0) else 0.0,
        "unfinished": values.unfinished,
        "seconds": {"read": item.read_seconds, **values.seconds},
    }
