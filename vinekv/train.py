"""The VinePPO training job: the warmed-up tiny policy improves on the arithmetic task.

Warm-up (or its cache) -> held-out accuracy -> VinePPO iterations with the rollouts' KV spilled
to ``<output>/kv`` -> held-out accuracy again, a per-step table and ``<output>/vinekv-train.png``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from configs import TrainConfig

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
    """Held-out accuracy of greedy and sampled (T = 1) completions."""

    greedy: float
    sampled: float


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
    warmup_cached: bool


def job_settings(output: Path, seed: int) -> dict:
    """Trainer settings of a local job writing under ``output``: no wandb, no final checkpoint,
    compiled generation, the store in ``output/kv``, one log line per step."""
    return {
        "save_directory": str(output / "checkpoints"),
        "do_last_save": False,
        "use_esurge_generation": False,
        "use_wandb": False,
        "do_eval": False,
        "shuffle_train_dataset": False,
        "progress_bar_type": "json",
        "track_memory": False,
        "report_steps": 1,
        "log_steps": 1,
        "generation_seed": seed,
        "vineppo_store": str(output / "kv"),
    }


def held_out_accuracy(model, tokenizer, dataset, seed: int) -> Accuracy:
    from vinekv.tasks.warmup import accuracy

    return Accuracy(
        greedy=accuracy(model, tokenizer, dataset),
        sampled=accuracy(model, tokenizer, dataset, temperature=1.0, seed=seed),
    )


def run_training(config: TrainConfig, progress: bool = True) -> TrainReport:
    """Trains per ``config`` and returns accuracies, per-step metrics and where the outputs are."""
    from kvstore import SnapshotStore
    from trainer.vineppo_config import VinePPOConfig
    from trainer.vineppo_trainer import VinePPOTrainer
    from vinekv.tasks.arithmetic import make_dataset, reward
    from vinekv.tasks.warmup import warm_up

    seconds = {}
    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    warmup_config = config.warmup_config()
    warmed = warm_up(warmup_config, progress=progress)
    seconds["warm-up"] = time.perf_counter() - start
    task = {"steps": warmup_config.task_steps, "operand_max": warmup_config.operand_max}
    held_out = make_dataset(config.eval_problems, config.eval_seed, **task)
    start = time.perf_counter()
    before = held_out_accuracy(warmed.model, warmed.tokenizer, held_out, config.seed)
    arguments = VinePPOConfig(**{**job_settings(output, config.seed), **config.trainer})
    store = arguments.vineppo_store
    trainer = VinePPOTrainer(
        arguments=arguments,
        model=warmed.model,
        reward_funcs=reward,
        train_dataset=make_dataset(config.train_problems, config.seed + 1, **task),
        processing_class=warmed.tokenizer,
    )
    seconds["evaluation"] = time.perf_counter() - start
    start = time.perf_counter()
    trained = trainer.train().state.model
    seconds["training"] = time.perf_counter() - start
    start = time.perf_counter()
    after = held_out_accuracy(trained, warmed.tokenizer, held_out, config.seed)
    seconds["evaluation"] += time.perf_counter() - start
    plot = plot_history(trainer.history, str(output / "vinekv-train.png")) if config.plot else None
    runs = []
    if arguments.vineppo_cache_strategy == "disk" and arguments.vineppo_keep_snapshots:
        with SnapshotStore.open(store, mode="r") as reader:
            runs = [r for r in reader.runs() if r.startswith(trainer._session)]
    return TrainReport(config, trainer.history, before, after, seconds, store, runs, plot, warmed.cached)


def plot_history(history: list[dict[str, float]], path: str) -> str:
    """PNG of reward, MC value mean and replay time share per step; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    for key, label in (("vineppo/trajectory_reward_mean", "rollout reward"), ("vineppo/mc_value_mean", "MC value")):
        top.plot(steps, [h.get(key, float("nan")) for h in history], marker="o", label=label)
    top.set_ylabel("mean")
    top.legend()
    bottom.plot(steps, [h.get("vineppo/replay_time_share", float("nan")) for h in history], marker="s", color="C2")
    bottom.set_ylabel("replay share of step time")
    bottom.set_xlabel("optimizer step")
    fig.suptitle("vinekv train")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_training(report: TrainReport) -> str:
    cfg, args = report.config, report.config.trainer
    header = [name for name, _, _ in COLUMNS]
    rows = []
    for h in report.history:
        cells = []
        for _, key, fmt in COLUMNS:
            value = h.get(key, float("nan"))
            cells.append(fmt.format(value / 1024 if key == "vineppo/store_bytes" else value))
        rows.append(cells)
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    n, warmup = cfg.eval_problems, "cached" if report.warmup_cached else "trained now"
    lines = [
        f"vinekv train: arithmetic task, warmed-up tiny policy ({warmup}), "
        f"vineppo_mode={args.get('vineppo_mode')}, cache strategy {args.get('vineppo_cache_strategy')}",
        "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
        *("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows),
        "",
        f"held-out accuracy ({n} problems): greedy {report.before.greedy:.3f} -> {report.after.greedy:.3f}, "
        f"sampled {report.before.sampled:.3f} -> {report.after.sampled:.3f} "
        f"(standard error ~{(0.25 / n) ** 0.5:.3f})",
        "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items()),
        f"store: {report.store}"
        + (f" ({len(report.runs)} runs kept, one per batch; `vinekv inspect {report.store}`)" if report.runs else ""),
    ]
    if report.plot:
        lines.append(f"plot: {report.plot}")
    return "\n".join(lines)
