"""Offline branch replay: a stored run's snapshots -> branches -> rewards -> MC values in the store.

For every trajectory of a run: pick its states (step starts in full mode, anchors in Lite
mode; `trajectory_states`), read the longest prefix a state needs from the store once (every
state is a prefix of it; the next batch's reads overlap this one's decoding), sample K
branches per valued state with `generate_branches` (each within the rollout's remaining token
budget), ``trajectories_per_call`` trajectories together with each distinct state sampled once
(`value_trajectories`: a group's prompt state, equal leading steps), score ``response prefix ++
branch`` with the reward functions, fold returns into MC values, and write them back next to
the snapshot metadata (``fields["mc"]``, a `MCRecord`), atomically per trajectory. Branch i of
a state has its own key, from the state's tokens (`state_key`), not from the trajectory: a
trajectory already valued under the same settings gets only the branches it lacks (more K,
adaptive rounds) and a settled one is skipped, so a killed replay, run again, finishes the rest
and gives the same values as an uninterrupted one. Values sampled by another policy (the
record's ``policy`` fingerprint) are not values of this one: such a trajectory is valued again
from scratch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from kvstore.dense_cache import kv_bytes_per_token
from kvstore.fingerprint import policy_fingerprint
from kvstore.state import CachedState
from kvstore.store import SnapshotStore
from replay.decode import SAMPLERS
from replay.engines import BranchEngine, ESurgeOptions, open_engine
from replay.rewards import RewardFn, score
from replay.sampler import ENGINES, generate_branches
from replay.steps import SELECTIONS, Splitter, content_length, lite_anchors, step_starts, valued_states
from replay.text import special_ids, text_offsets
from replay.values import MCRecord, MCStats, branch_returns, branches_wanted, mc_values, ragged

logger = logging.getLogger(__name__)

MODES = ("full", "lite")
# Above this share of branches cut off by their budget, a replay warns (values may only say "too short").
TRUNCATION_WARNING = 0.5
# Settings that change how many branches run, not what a branch returns: a stored run valued
# with other values of these is extended, not redone.
_COUNT_FIELDS = (
    "branches",
    "max_branches",
    "adaptive_ci",
    "max_rows",
    "trajectories_per_call",
    "batch_kv_mb",
    "engine",
)
# How branches are keyed (`state_key`); part of `ReplayConfig.digest`, so stored returns drawn
# under another scheme are redone rather than extended.
BRANCH_KEYS = "state-prefix"


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """Settings of a branch replay.

    Attributes:
      mode: ``full`` (every step start) or ``lite`` (anchors).
      branches: K continuations per state (with ``adaptive_ci``: per round).
      max_tokens: token budget of a branch (``vineppo_max_depth`` / ``lite_branch_max_len``).
      horizon: the rollouts' token budget (``max_completion_length``): a branch from response
        position b gets at most ``horizon - b`` tokens, so its return is the return of the same
        truncated episode as a rollout's. None: ``max_tokens`` only.
      temperature, top_p, top_k, stop: sampling settings of the branches.
      stop_token_ids: tokens that end a branch besides the EOS ids (`replay.sampler.eos_token_ids`).
      sampler: whose truncation order the branches reproduce: ``generate`` (EasyDeL's compiled
        ``generate``: temperature, top-k, top-p) or ``esurge`` (top-k, top-p, then temperature).
      delimiter: step delimiter of full mode (``"\\n"``, as the VinePPO reference for GSM8K).
      max_states: cap on valued states per trajectory in full mode, None for no cap.
      state_selection: which states a cap values: ``first`` | ``spread`` | ``entropy``
        (`replay.steps.valued_states`); the others are filled backwards from the next value.
      lite_anchor_stride: Lite mode: also an anchor every this many response tokens.
      lite_quartiles: Lite mode: also anchors at 0 and the quartiles of the response.
      unfinished_reward: return of a branch cut off by its budget (None: score the truncated
        completion like a finished one).
      max_branches: cap on branches per state with ``adaptive_ci`` (default ``branches``).
      adaptive_ci: target 95% confidence half-width of a state's value: states above it get
        another round of ``branches``, up to ``max_branches``. None: exactly ``branches``.
      seed: run seed of the branch PRNG keys.
      max_rows: branches decoded at once (the dense engine's cache rows; eSurge's batch).
      trajectories_per_call: `replay_run` reads and values up to this many trajectories together
        (their equal states once, `value_trajectories`).
      batch_kv_mb: ... and no more than fit in this many MiB of KV (whole trajectories, at the
        model's KV dtype; at least one): the snapshots `replay_run` holds are this batch and the
        next one, read meanwhile, whatever the run's size.
      engine: ``auto`` | ``vanilla`` | ``esurge``.
    """

    mode: str = "full"
    branches: int = 8
    max_tokens: int = 256
    horizon: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    sampler: str = "generate"
    delimiter: str = "\n"
    max_states: int | None = None
    state_selection: str = "first"
    lite_anchor_stride: int | None = None
    lite_quartiles: bool = False
    unfinished_reward: float | None = 0.0
    max_branches: int | None = None
    adaptive_ci: float | None = None
    seed: int = 0
    max_rows: int = 64
    trajectories_per_call: int = 16
    batch_kv_mb: float = 64.0
    engine: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(sorted(int(i) for i in self.stop_token_ids)))
        choices = {"mode": MODES, "engine": ENGINES, "sampler": SAMPLERS, "state_selection": SELECTIONS}
        errors = [
            f"{name} must be one of {allowed}, got {getattr(self, name)!r}"
            for name, allowed in choices.items()
            if getattr(self, name) not in allowed
        ]
        errors += [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("branches", "max_tokens", "max_rows", "trajectories_per_call")
            if getattr(self, name) < 1
        ]
        errors += [
            f"{name} must be >= 1 or None, got {getattr(self, name)}"
            for name in ("max_states", "horizon", "max_branches")
            if getattr(self, name) is not None and getattr(self, name) < 1
        ]
        if self.max_branches is not None and self.max_branches < self.branches:
            errors.append(f"max_branches ({self.max_branches}) must be >= branches ({self.branches})")
        if not self.batch_kv_mb > 0:
            errors.append(f"batch_kv_mb must be > 0, got {self.batch_kv_mb}")
        if self.adaptive_ci is not None and not self.adaptive_ci > 0:
            errors.append(f"adaptive_ci must be > 0 or None, got {self.adaptive_ci}")
        if self.temperature < 0:
            errors.append(f"temperature must be >= 0, got {self.temperature}")
        if not self.delimiter:
            errors.append("delimiter must be a non-empty string")
        if errors:
            raise ValueError("invalid ReplayConfig: " + "; ".join(errors))

    @property
    def branch_cap(self) -> int:
        """Most branches a state gets."""
        return self.max_branches if self.adaptive_ci is not None and self.max_branches else self.branches

    def sampling_params(self, n: int | None = None) -> Any:
        """EasyDeL `SamplingParams` of ``n`` branches per state (default ``branches``)."""
        from easydel.inference.sampling_params import SamplingParams

        if n is not None and n < 1:
            raise ValueError(f"n must be >= 1 branches, got {n}")
        return SamplingParams(
            n=self.branches if n is None else n,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
        )

    def branch_budgets(self, starts: np.ndarray) -> np.ndarray:
        """``[S]`` token budget of a branch from each response position in ``starts``."""
        budget = np.full(len(starts), self.max_tokens, np.int64)
        if self.horizon is None:
            return budget
        starts = np.asarray(starts, np.int64)
        if np.any(starts >= self.horizon):
            raise ValueError(
                f"horizon {self.horizon} leaves no token for a branch from response positions "
                f"{starts[starts >= self.horizon].tolist()}: it must exceed every rollout's length"
            )
        return np.minimum(budget, self.horizon - starts)

    def digest(self) -> str:
        """Identity of the settings that determine a branch's return (counts and batching excluded)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in _COUNT_FIELDS}
        fields["branch_keys"] = BRANCH_KEYS
        return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=8).hexdigest()


@dataclasses.dataclass
class ReplayReport:
    """Counts and seconds (``read``, ``decode``, ``score``) of a replay; ``branches_per_state``
    holds the final K of every state valued (adaptive K varies it). ``states`` counts every
    trajectory's valued states, ``sampled_states`` the distinct ones branches were sampled for
    (equal states of several trajectories share their branches, `value_trajectories`);
    ``branches``, ``unfinished`` and ``branch_tokens`` count what was sampled,
    ``separate_branches`` what valuing every trajectory alone would have sampled. ``stale``: trajectories
    (among ``trajectories``) valued again from scratch because their stored values came from
    another policy."""

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
        """Adds the counts, per-state K and seconds of another replay (e.g. another worker's)."""
        for field in dataclasses.fields(ReplayReport):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if isinstance(mine, list):
                mine.extend(theirs)
            elif isinstance(mine, dict):
                for name, seconds in theirs.items():
                    mine[name] = mine.get(name, 0.0) + seconds
            else:
                setattr(self, field.name, mine + theirs)

    def add(self, values: StateValues, response_len: int, read_seconds: float = 0.0) -> None:
        """Counts one valued trajectory (the branches sampled now, not earlier ones)."""
        counts = values.stats.count
        self.trajectories += 1
        self.states += int((counts > 0).sum())
        states, branches, tokens, unfinished = values.sampled
        self.sampled_states += states
        self.separate_branches += values.new_branches
        self.branches += branches
        self.unfinished += unfinished
        self.branch_tokens += tokens
        self.rollout_tokens += response_len
        self.branches_per_state.extend(int(c) for c in counts if c > 0)
        self.seconds["read"] += read_seconds
        for name, seconds in values.seconds.items():
            self.seconds[name] += seconds


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


def replay_run(
    store: SnapshotStore,
    run: str,
    model: Any,
    tokenizer: Any,
    reward_fns: RewardFn | Sequence[RewardFn],
    config: ReplayConfig = ReplayConfig(),
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
    ``vinekv_entropy`` fields (per response token) feed ``state_selection="entropy"``.
    ``engine``: a started branch engine; default: ``config.engine`` opened for this run (with
    ``esurge_options``) and closed after.

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
        info = store.trajectory_info(run, tid)
        tokens[tid] = info["prompt_len"] + len(info["response_token_ids"])
        record = stored_record(info["fields"])
        if record is not None and record.made_by(info["fingerprint"]) != fingerprint:
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

    def read(tid: str) -> dict[str, Any]:
        start = time.perf_counter()
        info = store.trajectory_info(run, tid)
        fields = info["fields"]
        record = None if tid in revalue else stored_record(fields)
        plan = plan_trajectory(
            info["response_token_ids"],
            tokenizer,
            config,
            splitter=splitter,
            entropy=fields.get("vinekv_entropy"),
            record=record,
        )
        # the policy of the record written: that of the returns kept, else this model's
        policy = record.made_by(info["fingerprint"]) if record is not None and any(plan.prior) else fingerprint
        needed = [int(plan.positions[i]) for i in plan.needed(config)]
        states = {}
        if needed:  # one read of the longest prefix serves every state: each is a prefix of it
            prompt_len = info["prompt_len"]
            longest = store.read_prefix(
                run, tid, prompt_len + max(needed), model=model, allow_stale=allow_stale, fingerprint=fingerprint
            )
            states = {b: longest.prefix(prompt_len + b) for b in needed}
        return {
            "tid": tid,
            "info": info,
            "plan": plan,
            "policy": policy,
            "states": states,
            "read": time.perf_counter() - start,
        }

    opened = None
    if engine is None and todo:
        engine = opened = open_engine(
            config.engine, model, tokenizer=tokenizer, max_rows=config.max_rows, esurge_options=esurge_options
        )
    batches = replay_batches([tokens[t] for t in todo], kv_bytes_per_token(model), config)
    batches = [[todo[i] for i in batch] for batch in batches]
    try:
        with ThreadPoolExecutor(max_workers=1) as reader:
            read_batch = lambda tids: [read(t) for t in tids]  # noqa: E731
            pending = reader.submit(read_batch, batches[0]) if batches else None
            for i in range(len(batches)):
                items = pending.result()
                if i + 1 < len(batches):
                    pending = reader.submit(read_batch, batches[i + 1])
                for line in _value_stored(store, run, model, tokenizer, reward_fns, config, items, report, engine):
                    if metrics:
                        metrics.write(json.dumps(line) + "\n")
                        metrics.flush()
                bar.update(len(items))
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


def stored_record(fields: dict[str, Any]) -> MCRecord | None:
    """The trajectory's `MCRecord`, or None when it has none or one in an older format."""
    mc = fields.get("mc")
    if mc is None:
        return None
    try:
        return MCRecord.from_fields(mc)
    except ValueError:
        return None


def _settled(record: MCRecord, config: ReplayConfig) -> bool:
    valued = record.stats.count > 0
    plan = TrajectoryPlan(record.response_positions, valued, record.returns)
    return plan.needed(config).size == 0


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


def reward_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The stored fields reward functions receive: all but ``mc`` and vinekv's own ``vinekv_*``."""
    return {k: v for k, v in fields.items() if k != "mc" and not k.startswith("vinekv_")}


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


def _value_stored(store, run, model, tokenizer, reward_fns, config, items, report, engine) -> list[dict]:
    """Values the read ``items`` together (`value_trajectories`), writes each one's `MCRecord`
    into the store and counts it; returns one metrics line per trajectory."""
    requests = [
        ValueRequest(i["info"]["response_token_ids"], i["plan"], i["states"], reward_fields(i["info"]["fields"]))
        for i in items
    ]
    valued = value_trajectories(model, tokenizer, reward_fns, config, requests, engine)
    lines = []
    for item, values in zip(items, valued, strict=True):
        info, tid = item["info"], item["tid"]
        response = info["response_token_ids"]
        record = trajectory_record(config, info["prompt_len"], item["plan"], values, item["policy"])
        store.annotate(run, tid, mc=record.to_fields())
        report.add(values, len(response), item["read"])
        stats = values.stats
        lines.append(
            {
                "trajectory": tid,
                "states": int((stats.count > 0).sum()),
                "branches": values.new_branches,
                "branches_per_state": stats.count.tolist(),
                "branch_tokens": values.new_tokens,
                "budget_branch_tokens_per_rollout_token": values.new_tokens / max(1, len(response)),
                "mc_mean": [None if np.isnan(m) else m for m in stats.mean.tolist()],
                "mc_var_mean": float(np.nanmean(stats.var)) if np.any(stats.count > 0) else 0.0,
                "unfinished": values.unfinished,
                "seconds": {"read": item["read"], **values.seconds},
            }
        )
    return lines
