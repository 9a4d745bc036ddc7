"""`vinekv rollout`: sample a group of responses per task prompt and spill their KV to a store.

The run it writes is what `vinekv replay` values and `vinekv train --offline-run` trains on:
one trajectory per response (id ``<row:06d>``, row = prompt index x group + member), each with
the task's fields (``answer``, ``solution``), ``vinekv_reward`` and ``vinekv_group``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """What `sample_run` samples.

    Attributes:
      problems: task prompts (the first ``problems`` of `vinekv train`'s problems for ``seed``).
      group: responses per prompt (GRPO's ``num_return_sequences``).
      seed: the problems' seed (as `vinekv train --seed`) and the run seed of the sampling keys.
      max_tokens: token budget of a response (the trainer's ``max_completion_length``).
      temperature, top_p, top_k: sampling (top_p 1 and top_k 0: off), in `generate`'s order.
      batch_prompts: prompts sampled and captured together.
    """

    problems: int = 16
    group: int = 4
    seed: int = 0
    max_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_prompts: int = 8

    def __post_init__(self) -> None:
        for name in ("problems", "group", "max_tokens", "batch_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass(frozen=True)
class RolloutReport:
    """A sampled run: counts, mean reward, share of responses that ended (EOS) within the
    budget, the run's raw and stored KV bytes, and seconds of sampling and capture + spill."""

    run: str
    prompts: int
    trajectories: int
    reward_mean: float
    finished: float
    raw_bytes: int
    stored_bytes: int
    seconds: dict[str, float]


def sample_rollouts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    config: RolloutConfig,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Any], list[bool]]:
    """``config.group`` responses per prompt, sampled from the prompt's KV with the dense branch engine.

    Returns the `trainer.rollouts.Rollout` list (prompt i's members in rows ``i*group..``) and
    whether each response ended in a stop token. Keys: ``(config.seed, prompt index, member)``.
    """
    from easydel.inference.sampling_params import SamplingParams

    from vinekv.kvstore.capture import capture_state
    from vinekv.replay.sampler import generate_branches
    from vinekv.trainer.rollouts import Rollout

    params = SamplingParams(
        n=config.group,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
    )
    rollouts, finished = [], []
    for lo in range(0, len(prompts), config.batch_prompts):
        encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts[lo : lo + config.batch_prompts]]
        states = [capture_state(model, np.asarray([ids], np.int32), len(ids)) for ids in encoded]
        keys = [(lo + i, 0) for i in range(len(encoded))]
        for i, branches in enumerate(
            generate_branches(
                model, states, params, "vanilla", config.seed, tokenizer=tokenizer, state_keys=keys
            )  # the dense engine: each response is keyed by (seed, prompt, member), whatever the batch
        ):
            for tokens, done in zip(branches.tokens, branches.finished, strict=True):
                row = len(rollouts)
                rollouts.append(Rollout(np.asarray(encoded[i], np.int32), tokens.astype(np.int32), lo + i, row))
                finished.append(bool(done))
        if progress is not None:
            progress(len(encoded))
    return rollouts, finished


def sample_run(
    store_path: str | Path,
    run: str,
    model: Any,
    tokenizer: Any,
    dataset: Any,
    reward: Callable[..., list[float]],
    config: RolloutConfig,
    codec: str = "int8",
    progress: bool = True,
    policy_spec: str | None = None,
    reward_spec: str | None = None,
) -> RolloutReport:
    """Samples ``config.group`` responses for each row of ``dataset`` (``prompt`` plus task
    columns), scores them with ``reward`` and spills every trajectory into ``run`` (a new run),
    recording in the run how they were sampled and, when given, the specs of the policy and the
    reward (`RolloutRecipe`: `vinekv replay` takes its defaults from it)."""
    from tqdm.auto import tqdm

    from vinekv.kvstore import SnapshotStore
    from vinekv.replay.branch_replay import score_completions
    from vinekv.replay.config import RolloutRecipe
    from vinekv.trainer.task_fields import row_fields
    from vinekv.trainer.value_estimation import spill_rollouts

    rows = [dataset[i] for i in range(len(dataset))]
    with SnapshotStore.open(store_path, mode="a", codec=codec) as store:
        if run in store.runs():
            raise ValueError(f"run {run!r} already exists in {store_path}: choose another --run")
        start = time.perf_counter()
        with tqdm(total=len(rows), desc="rollout prompts", unit="prompt", disable=not progress) as bar:
            rollouts, finished = sample_rollouts(model, tokenizer, [r["prompt"] for r in rows], config, bar.update)
        fields = [row_fields(rows[r.group]) for r in rollouts]
        groups = [rollouts[lo : lo + config.group] for lo in range(0, len(rollouts), config.group)]
        rewards = np.concatenate(
            [
                score_completions(reward, tokenizer, g[0].prompt_ids, [r.response_ids for r in g], fields[g[0].row])
                for g in groups
            ]
        )
        sampled = time.perf_counter() - start
        recipe = RolloutRecipe(
            config.max_tokens, config.temperature, config.top_p, config.top_k, policy=policy_spec, reward=reward_spec
        )
        stats = spill_rollouts(
            store, run, model, rollouts, fields, rewards, batch_rows=config.batch_prompts, recipe=recipe
        )
        size = store.size(run)
    return RolloutReport(
        run=run,
        prompts=len(rows),
        trajectories=len(rollouts),
        reward_mean=float(rewards.mean()),
        finished=float(np.mean(finished)),
        raw_bytes=size.raw,
        stored_bytes=size.stored,
        seconds={"sampling": sampled, "capture + spill": sum(stats.seconds.values())},
    )


def format_rollout(report: RolloutReport, store: str) -> str:
    return (
        f"run {report.run!r} in {store}: {report.trajectories} trajectories ({report.prompts} prompts x "
        f"{report.trajectories // max(1, report.prompts)}), mean reward {report.reward_mean:.3f}, "
        f"{report.finished:.0%} ended within the budget; KV {report.raw_bytes / 2**20:.2f} MiB raw, "
        f"{report.stored_bytes / 2**20:.2f} MiB stored; time: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
        + f"\nnext: vinekv replay {store} --run {report.run}   (model, reward and sampling: as recorded in the run)"
    )
