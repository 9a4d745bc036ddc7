"""The VinePPO training job: the warmed-up tiny policy on the arithmetic task, or a local model
on GSM8K-format data.

Policy (warm-up or its cache; or the model folder) -> held-out accuracy -> VinePPO iterations
with the rollouts' KV spilled to ``<output>/kv`` -> held-out accuracy again, a per-step table,
``<output>/vinekv-train.png`` and the policy checkpoint in ``<output>/checkpoints``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from vinekv.configs import TrainConfig
from vinekv.configs.train import CHECKPOINT_MODEL_NAME

COLUMNS = (
    ("step", "step", "{:.0f}"),
    ("reward", "vineppo/trajectory_reward_mean", "{:.3f}"),
    ("V mean", "vineppo/mc_value_mean", "{:.3f}"),
    ("V var", "vineppo/mc_value_var", "{:.4f}"),
    ("states", "vineppo/states", "{:.0f}"),
    ("branches", "vineppo/branches", "{:.0f}"),
    ("budget", "vineppo/budget_branch_tokens_per_rollout_token", "{:.1f}"),
    ("store KiB", "vineppo/store_bytes", "{:.0f}"),
    ("replay share", "vineppo/replay_time_share", "{:.0%}"),
    ("loss", "loss", "{:+.4f}"),
)


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """Held-out grades ``[N]`` (one per problem) of greedy and sampled (T = 1) completions."""

    greedy_solved: tuple[float, ...]
    sampled_solved: tuple[float, ...]

    @property
    def greedy(self) -> float:
        return float(np.mean(self.greedy_solved))

    @property
    def sampled(self) -> float:
        return float(np.mean(self.sampled_solved))


def paired_gain(before: tuple[float, ...], after: tuple[float, ...]) -> tuple[float, float]:
    """``(mean gain, its standard error)`` of per-problem grades ``[N]`` measured twice on the
    same problems: the standard error of the mean of the paired differences (ddof 1)."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    if diff.size < 2:
        return float(diff.mean()), float("nan")
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))


@dataclasses.dataclass(frozen=True)
class TrainReport:
    config: TrainConfig
    history: list[dict[str, float]]
    before: Accuracy
    after: Accuracy
    seconds: dict[str, float]
    store: str
    runs: list[str]
    plot: str | None
    setup: TaskSetup
    start_step: int
    checkpoint: str | None


METRICS_FILE = "metrics.jsonl"


def latest_checkpoint(output: Path) -> Path | None:
    """The newest EasyDeL checkpoint a job wrote under ``output``, or None."""
    from eformer.serialization.checkpointer import find_latest_checkpoint

    folder = output / "checkpoints" / CHECKPOINT_MODEL_NAME
    found = find_latest_checkpoint(str(folder)) if folder.is_dir() else None
    return None if found is None else Path(found)


def checkpoint_step(checkpoint: Path) -> int:
    """The update a checkpoint folder (``run-<step>``, as EasyDeL names them) was saved at."""
    prefix, _, step = checkpoint.name.rpartition("-")
    if prefix != "run" or not step.isdigit():
        raise ValueError(f"{checkpoint}: not a checkpoint folder of `vinekv train` (run-<step>)")
    return int(step)


def after_interrupt(output: Path) -> str:
    """What an interrupted job left to continue from, in one line."""
    latest = latest_checkpoint(output)
    if latest is None:
        return f"no checkpoint under {output / 'checkpoints'} yet (--save-steps N saves along the way)"
    return f"checkpoint at update {checkpoint_step(latest)} kept ({latest}); continue with --resume"


class NothingToDo(Exception):
    """A resumed job whose checkpoint already reached its ``max_training_steps``."""


def load_policy(output: str | Path, warmup: dict | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the task policy of the newest checkpoint a `vinekv train` job wrote
    under ``output`` (its warm-up, per ``warmup`` WarmupConfig fields, gives the module)."""
    from easydel.infra.base_state import EasyDeLState

    from vinekv.tasks.warmup import WarmupConfig, warm_up
    from vinekv.trainer.vineppo_trainer import resumed_into

    checkpoint = latest_checkpoint(Path(output))
    if checkpoint is None:
        raise ValueError(f"{output} holds no checkpoint of `vinekv train` (looked in {Path(output) / 'checkpoints'})")
    warmed = warm_up(WarmupConfig(**(warmup or {})), progress=False)
    model = warmed.model
    loaded = EasyDeLState.load_state(
        load_directory=str(checkpoint),
        dtype=model.dtype,
        param_dtype=model.param_dtype,
        precision=model.precision,
        auto_shard_model=True,
        partition_axis=model.config.partition_axis,
        model_task=model.model_task,
    )
    return resumed_into(loaded, model).model, warmed.tokenizer


def held_out_accuracy(model: Any, setup: TaskSetup, config: TrainConfig, sampled: bool = True) -> Accuracy:
    """Grades on the held-out problems, greedy and (unless not ``sampled``) at T = 1."""
    from vinekv.tasks.warmup import solved

    grading = {
        "max_new_tokens": config.eval_max_tokens,
        "batch_size": config.eval_batch_size,
        "grade": setup.reward,
    }
    at_t1 = (
        solved(model, setup.tokenizer, setup.held_out, temperature=1.0, seed=config.seed, **grading) if sampled else ()
    )
    return Accuracy(
        tuple(solved(model, setup.tokenizer, setup.held_out, **grading).tolist()),
        tuple(np.asarray(at_t1).tolist()),
    )


class MetricsLog:
    """A `trainer.vineppo_trainer.StepCallback` appending each step's metrics to a JSON-lines
    file (one object per line, ``step`` first; the file grows across resumed runs)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, state: Any, entry: dict[str, float]) -> None:
        line = json.dumps({"step": entry["step"], **entry, "time": time.time()})
        with self.path.open("a") as f:
            f.write(line + "\n")


class HeldOutEvaluation:
    """A `StepCallback` adding ``eval/greedy_accuracy`` (held-out, greedy) every ``every`` updates."""

    def __init__(self, setup: TaskSetup, config: TrainConfig, every: int):
        self.setup, self.config, self.every = setup, config, every
        self.last = None

    def __call__(self, state: Any, entry: dict[str, float]) -> dict[str, float] | None:
        step = int(entry["step"])
        if self.last is None:
            self.last = step - (step % self.every)  # resumed runs keep the same grid
        if step - self.last < self.every:
            return None
        self.last = step - (step % self.every)
        return {"eval/greedy_accuracy": held_out_accuracy(state.model, self.setup, self.config, sampled=False).greedy}


@dataclasses.dataclass(frozen=True)
class TaskSetup:
    """What a job trains: the starting policy and tokenizer, training and held-out datasets
    (``prompt``/``answer`` columns), the reward function and a one-line description."""

    model: Any
    tokenizer: Any
    train: Any
    held_out: Any
    reward: Any
    description: str


def task_setup(config: TrainConfig, progress: bool = True) -> TaskSetup:
    """The arithmetic task on its warm-up policy, or GSM8K-format data on a local model."""
    if config.task == "gsm8k":
        return _gsm8k_setup(config)
    from vinekv.tasks.arithmetic import make_dataset, reward
    from vinekv.tasks.warmup import warm_up

    warmup_config = config.warmup_config()
    warmed = warm_up(warmup_config, progress=progress)
    task = {"steps": warmup_config.task_steps, "operand_max": warmup_config.operand_max}
    return TaskSetup(
        warmed.model,
        warmed.tokenizer,
        make_dataset(config.train_problems, config.seed + 1, **task),
        make_dataset(config.eval_problems, config.eval_seed, **task),
        reward,
        f"arithmetic task, warmed-up tiny policy ({'cached' if warmed.cached else 'trained now'})",
    )


def _gsm8k_setup(config: TrainConfig) -> TaskSetup:
    import jax.numpy as jnp

    from vinekv.models import load_model
    from vinekv.tasks.gsm8k import load_jsonl, reward

    for name in ("model", "train_data", "eval_data"):
        if not Path(getattr(config, name)).exists():
            raise FileNotFoundError(
                f"{name} = {getattr(config, name)!r} does not exist: task 'gsm8k' needs the model folder and "
                "JSONL files on disk (docs/training.md, 'Real runs')"
            )
    model, tokenizer = load_model(
        config.model, dtype=getattr(jnp, config.dtype), sharding_axis_dims=config.sharding_axis_dims or None
    )
    tokenizer.padding_side = "left"  # GRPO generates from left-padded prompts

    def prompts(path: str, limit: int) -> Any:
        data = load_jsonl(path, prompt_template=config.prompt_template)
        data = data.select(range(min(limit, len(data))))
        if not (config.chat_template and getattr(tokenizer, "chat_template", None)):
            return data
        return data.map(
            lambda row: {
                "prompt": tokenizer.apply_chat_template(
                    [{"role": "user", "content": row["prompt"]}], tokenize=False, add_generation_prompt=True
                )
            }
        )

    return TaskSetup(
        model,
        tokenizer,
        prompts(config.train_data, config.train_problems),
        prompts(config.eval_data, config.eval_problems),
        reward,
        f"gsm8k ({config.train_data}), model {config.model} ({config.dtype})",
    )


def run_training(config: TrainConfig, progress: bool = True) -> TrainReport:
    """Trains per ``config`` and returns accuracies, per-step metrics and where the outputs are."""
    from vinekv.kvstore import SnapshotStore
    from vinekv.trainer.vineppo_trainer import VinePPOTrainer

    seconds = {}
    output = Path(config.output)
    arguments = config.trainer_arguments()
    latest = latest_checkpoint(output)
    if config.resume and latest is None:
        raise ValueError(f"resume: {output / 'checkpoints'} holds no checkpoint of an earlier run to resume from")
    if not config.resume and latest is not None:
        raise ValueError(
            f"{output} already holds a checkpoint ({latest}): resume from it (--resume), "
            "or give another --output (or remove the folder) to start afresh"
        )
    if config.resume and (done := checkpoint_step(latest)) >= arguments.max_training_steps:
        raise NothingToDo(
            f"the checkpoint {latest} is at update {done}, already at or past "
            f"--steps {arguments.max_training_steps}: nothing trained, nothing changed (give more --steps to continue)"
        )
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    setup = task_setup(config, progress)
    seconds["warm-up" if config.task == "arithmetic" else "loading"] = time.perf_counter() - start
    store = arguments.vineppo_store
    trainer = VinePPOTrainer(
        arguments=arguments,
        model=setup.model,
        reward_funcs=setup.reward,
        train_dataset=setup.train,
        processing_class=setup.tokenizer,
    )
    start_step = int(trainer.model_state.step)
    if config.resume and start_step == 0:  # EasyDeL logs a failed load and starts afresh: refuse instead
        raise ValueError(f"resume: could not load {latest} (see the warning above)")
    start = time.perf_counter()
    before = held_out_accuracy(trainer.model_state.model, setup, config)
    seconds["evaluation"] = time.perf_counter() - start
    if config.eval_every:
        trainer.step_callbacks.append(HeldOutEvaluation(setup, config, config.eval_every))
    trainer.step_callbacks.append(MetricsLog(output / METRICS_FILE))
    start = time.perf_counter()
    try:
        trained = trainer.train().state.model
    except KeyboardInterrupt:
        raise KeyboardInterrupt(after_interrupt(output)) from None
    finally:
        trainer.close()
    if trainer.interrupted:  # EasyDeL caught the interrupt and saved a checkpoint
        raise KeyboardInterrupt(after_interrupt(output))
    seconds["training"] = time.perf_counter() - start
    start = time.perf_counter()
    after = held_out_accuracy(trained, setup, config)
    seconds["evaluation"] += time.perf_counter() - start
    plot = None
    if config.plot:
        history = read_metrics(output / METRICS_FILE)
        plot = plot_history(
            [{"step": start_step, "eval/greedy_accuracy": before.greedy}, *history], str(output / "vinekv-train.png")
        )
    runs = []
    if arguments.vineppo_cache_strategy == "disk" and arguments.vineppo_keep_snapshots:
        with SnapshotStore.open(store, mode="r") as reader:
            runs = [r for r in reader.runs() if r.startswith(trainer._session)]
    saved = latest_checkpoint(output)
    return TrainReport(
        config, trainer.history, before, after, seconds, store, runs, plot, setup, start_step, saved and str(saved)
    )


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The step entries of a ``metrics.jsonl`` (every run of the job, resumed ones included)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


PLOTTED = (
    ("held-out accuracy (greedy)", ("eval/greedy_accuracy",)),
    ("rollout reward", ("vineppo/trajectory_reward_mean",)),
    ("loss", ("loss",)),
    ("KL per token", ("policy_kl", "mean_kl")),
    ("clip fraction", ("clip_ratio/region_mean",)),
    ("entropy per token (nats)", ("mean_entropy",)),
)


def plot_history(history: list[dict[str, float]], path: str) -> str:
    """PNG of the per-step metrics (`PLOTTED`, in step order): held-out accuracy where evaluated
    (`run_training` adds the evaluation before training at its start step), rollout
    reward, loss, KL (to the rollout policy; to the reference when ``beta`` > 0), clip fraction
    and entropy; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex=True)
    for ax, (title, keys) in zip(axes.ravel(), PLOTTED, strict=True):
        for key in keys:
            points = sorted((h["step"], h[key]) for h in history if key in h and np.isfinite(h[key]))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if key.startswith("eval/") else None, ms=3, label=key)
        ax.set_title(title)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("policy update")
    fig.suptitle("vinekv train")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_training(report: TrainReport) -> str:
    args = report.config.trainer
    header = [name for name, _, _ in COLUMNS]
    rows = []
    for h in report.history:
        cells = []
        for _, key, fmt in COLUMNS:
            value = h.get(key, float("nan"))
            cells.append(fmt.format(value / 1024 if key == "vineppo/store_bytes" else value))
        rows.append(cells)
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    n = len(report.setup.held_out)
    resumed = f", resumed at step {report.start_step}" if report.start_step else ""
    lines = [
        f"vinekv train: {report.setup.description}, "
        f"vineppo_mode={args.get('vineppo_mode')}, cache strategy {args.get('vineppo_cache_strategy')}",
        "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
        *("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows),
        "",
        f"held-out accuracy ({n} problems{resumed}):",
        *(
            f"  {name:7s} {getattr(report.before, name):.3f} -> {getattr(report.after, name):.3f}: "
            "gain {:+.3f} +- {:.3f} (standard error, paired by problem)".format(
                *paired_gain(getattr(report.before, f"{name}_solved"), getattr(report.after, f"{name}_solved"))
            )
            for name in ("greedy", "sampled")
        ),
        "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()),
        f"metrics: {Path(report.config.output) / METRICS_FILE}",
        f"store: {report.store}"
        + (f" ({len(report.runs)} runs kept, one per batch; `vinekv inspect {report.store}`)" if report.runs else ""),
    ]
    if report.checkpoint:
        lines.append(f"checkpoint: {report.checkpoint} (continue with --resume and more --steps)")
    if report.plot:
        lines.append(f"plot: {report.plot}")
    return "\n".join(lines)
