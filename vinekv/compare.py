"""`vinekv compare`: GRPO vs PPO vs VinePPO-Lite vs full VinePPO on the arithmetic task, same warm-up.

``off``, ``lite`` and ``full`` are the same `VinePPOTrainer` (same PPO loss, epochs, batch,
learning rate and whitening) and differ only in their advantages: ``off`` is GRPO's
group-normalised sequence advantage, ``lite`` VinePPO-Lite (MC values at the anchors + mc_gae),
``full`` full VinePPO (MC values at every step start). ``ppo`` is EasyDeL's PPO with a value
network (`trainer.ppo_baseline`: GAE from a critic on the policy's trunk) with the same settings
(`ppo_config`). Each (method, seed) starts from the cached warm-up and trains
``updates`` policy updates, or until ``budget_s`` seconds of training (the same wall-clock
budget); held-out accuracy (greedy and sampled at T = 1) is measured before training and every
``eval_every`` updates, outside the timed training.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vinekv.trainer.advantages import METHOD_NAMES

METHODS = ("off", "ppo", "lite", "full")
LABELS = {**METHOD_NAMES, "ppo": "PPO"}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """What `compare` runs.

    Attributes:
      methods: subset of ``off`` (GRPO), ``ppo`` (PPO with a value network), ``lite``, ``full``.
      seeds: runs per method (seed s shuffles the training problems and seeds sampling).
      updates: policy updates per run (ignored with ``budget_s``).
      eval_every: updates between held-out evaluations.
      budget_s: if > 0, train each run for this many seconds of training time instead.
      max_updates: cap on updates with ``budget_s``.
      eval_problems, train_problems: held-out (seed 12345) and training (seed 1) problem counts.
      lite_anchor_stride: Lite's extra anchor every N response tokens (None: final anchor only;
        the final anchor alone leaves almost nothing to learn from, docs/benchmarks.md).
      warmup: `vinekv.tasks.warmup.WarmupConfig` fields over its defaults (the starting policy).
      trainer: `VinePPOConfig` fields over `vinekv.configs.train.DEFAULT_TRAINER` for every method
        (``ppo`` maps them with `trainer.ppo_baseline.ppo_config`).
    """

    methods: tuple[str, ...] = METHODS
    seeds: int = 5
    updates: int = 60
    eval_every: int = 10
    budget_s: float = 0.0
    max_updates: int = 400
    eval_problems: int = 400
    train_problems: int = 4000
    lite_anchor_stride: int | None = 8
    warmup: dict[str, Any] = dataclasses.field(default_factory=dict)
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        for name in ("seeds", "updates", "eval_every", "max_updates", "eval_problems", "train_problems"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget_s < 0:
            raise ValueError(f"budget_s must be >= 0, got {self.budget_s}")

    def trainer_settings(self, method: str, seed: int, out: Path) -> dict[str, Any]:
        """`vinekv train`'s settings (`DEFAULT_TRAINER`) for ``method``, KV kept in memory
        (``ppo``: the settings `ppo_config` maps, its ``vineppo_mode`` unused)."""
        from vinekv.configs.train import DEFAULT_TRAINER, job_settings, job_trainer

        return {
            **job_settings(out, seed),
            **job_trainer(
                {
                    "vineppo_mode": method,
                    "vineppo_cache_strategy": "memory",
                    "lite_num_branches": DEFAULT_TRAINER["vineppo_branches"],
                    "lite_branch_max_len": DEFAULT_TRAINER["max_completion_length"],
                    "lite_anchor_stride": self.lite_anchor_stride,
                    "max_training_steps": self.max_updates if self.budget_s else self.updates,
                    **self.trainer,
                }
            ),
        }


def build_trainer(method: str, seed: int, config: CompareConfig, train_data: Any, out: Path) -> tuple[Any, Any]:
    """``(trainer, warmed)``: ``method``'s trainer (`PPOBaselineTrainer` for ``ppo``, else
    `VinePPOTrainer`) on the cached warm-up ``warmed`` (`vinekv.tasks.warmup.warm_up`), training
    on ``train_data`` shuffled by ``seed`` with ``config``'s settings, its files under ``out``."""
    from vinekv.tasks.arithmetic import reward
    from vinekv.tasks.warmup import WarmupConfig, warm_up
    from vinekv.trainer.ppo_baseline import PPOBaselineTrainer, ppo_config
    from vinekv.trainer.vineppo_config import VinePPOConfig
    from vinekv.trainer.vineppo_trainer import VinePPOTrainer

    warmed = warm_up(WarmupConfig(**config.warmup), progress=False)
    settings = config.trainer_settings(method, seed, out / f"{method}-{seed}")
    if method == "ppo":
        build, arguments = PPOBaselineTrainer, ppo_config(settings)
    else:
        build, arguments = VinePPOTrainer, VinePPOConfig(**settings)
    trainer = build(
        arguments=arguments,
        model=warmed.model,
        reward_funcs=reward,
        train_dataset=train_data.shuffle(seed=seed),
        processing_class=warmed.tokenizer,
    )
    return trainer, warmed


def task_data(config: CompareConfig) -> tuple[Any, Any]:
    """``(held_out, train_data)``: ``eval_problems`` problems of seed 12345 and ``train_problems``
    of seed 1, of the warm-up's task (steps, operand range)."""
    from vinekv.tasks.arithmetic import make_dataset
    from vinekv.tasks.warmup import WarmupConfig

    task = WarmupConfig(**config.warmup)
    held_out = make_dataset(config.eval_problems, 12345, steps=task.task_steps, operand_max=task.operand_max)
    train_data = make_dataset(config.train_problems, 1, steps=task.task_steps, operand_max=task.operand_max)
    return held_out, train_data


def run_one(method: str, seed: int, config: CompareConfig, held_out: Any, train_data: Any, out: Path) -> dict:
    """One training run: its accuracy curve (``updates``, ``train_seconds``, ``greedy``,
    ``sampled`` per evaluation), the seconds of each batch and the trainer's per-batch metrics
    (``history``: PPO's value loss, VinePPO's MC statistics, ...)."""
    from vinekv.tasks.warmup import accuracy
    from vinekv.trainer.vineppo_trainer import VinePPOTrainer

    trainer, warmed = build_trainer(method, seed, config, train_data, out)
    updates = trainer.arguments.max_training_steps
    curve, step_seconds = [], []
    clock = {"train": 0.0, "since": time.perf_counter()}

    def evaluate(state: Any, step: int) -> None:
        clock["train"] += time.perf_counter() - clock["since"]
        model = state.model.model if method == "ppo" else state.model  # PPO's: the LM under the value head
        curve.append(
            {
                "updates": step,
                "train_seconds": clock["train"],
                "greedy": accuracy(model, warmed.tokenizer, held_out),
                "sampled": accuracy(model, warmed.tokenizer, held_out, temperature=1.0, seed=seed),
            }
        )
        point = curve[-1]
        print(
            f"  {LABELS[method]} seed {seed}: update {point['updates']}, greedy {point['greedy']:.3f}, "
            f"sampled {point['sampled']:.3f}, {point['train_seconds']:.0f} s of training",
            flush=True,
        )
        clock["since"] = time.perf_counter()

    execute = trainer._execute_train_step

    def execute_and_evaluate(state: Any, batch: Any) -> Any:
        start = time.perf_counter()
        state, metrics, error = execute(state, batch)
        step_seconds.append(time.perf_counter() - start)
        step = int(np.asarray(state.step))
        over_budget = config.budget_s and clock["train"] + time.perf_counter() - clock["since"] >= config.budget_s
        if step % config.eval_every == 0 or step >= updates or over_budget:
            evaluate(state, step)
        if over_budget:
            trainer.max_training_steps = step  # the training loop stops at its next check
        return state, metrics, error

    trainer._execute_train_step = execute_and_evaluate
    evaluate(trainer.model_state, 0)
    try:
        trainer.train()
    finally:
        if isinstance(trainer, VinePPOTrainer):  # its store and engines; PPO holds neither
            trainer.close()
    return {"method": method, "seed": seed, "curve": curve, "step_seconds": step_seconds, "history": trainer.history}


def compare(config: CompareConfig, on_run: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every (seed, method) run of ``config``, in that order (`run_one`'s dicts); ``on_run(results
    so far)`` after each run (e.g. to save them: a long comparison keeps what it measured)."""
    import jax

    held_out, train_data = task_data(config)
    results = []
    with tempfile.TemporaryDirectory(prefix="vinekv-compare-") as scratch:
        for seed in range(config.seeds):
            for method in config.methods:
                results.append(run_one(method, seed, config, held_out, train_data, Path(scratch)))
                if on_run is not None:
                    on_run(results)
                jax.clear_caches()  # XLA:CPU keeps memory maps per compiled program: 19 runs hit vm.max_map_count
                gc.collect()
    return results


def save_results(config: CompareConfig, results: list[dict], path: Path) -> Path:
    """``results`` with the config and machine as JSON at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": platform.platform(), "config": dataclasses.asdict(config), "results": results}
    path.write_text(json.dumps(payload, indent=1))
    return path


BASELINES = ("off", "ppo")  # the methods whose best peak the others are timed to reach


def plot_comparison(config: CompareConfig, results: list[dict], path: Path) -> Path:
    """PNG of held-out accuracy (greedy, sampled) against updates and against training seconds:
    one faint line per run; per method, the mean over seeds with its 95% t-interval (against
    updates) where the runs evaluate at the same update counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vinekv.compare_stats import curves, mean_ci

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    for row, metric in zip(axes, ("greedy", "sampled"), strict=True):
        for col, key in zip(row, ("updates", "train_seconds"), strict=True):
            for i, method in enumerate(config.methods):
                runs = [r for r in results if r["method"] == method]
                for r in runs:
                    col.plot([c[key] for c in r["curve"]], [c[metric] for c in r["curve"]], color=f"C{i}", alpha=0.25)
                if runs and len({tuple(c["updates"] for c in r["curve"]) for r in runs}) == 1:
                    updates, seconds, values = curves(runs, metric)
                    xs = updates if key == "updates" else seconds.mean(0)
                    ci = np.array([mean_ci(v)[1] for v in values.T]) if len(runs) > 1 else None
                    col.errorbar(
                        xs, values.mean(0), yerr=ci, color=f"C{i}", marker="o", ms=3, capsize=3, label=LABELS[method]
                    )
                else:
                    col.plot([], [], color=f"C{i}", label=LABELS[method])
            col.set_xlabel("policy updates" if key == "updates" else "training seconds (mean over seeds)")
            col.set_title(f"held-out accuracy, {metric}")
            col.legend(fontsize=8)
        row[0].set_ylabel(f"accuracy ({config.eval_problems} problems)")
    seeds = len({r["seed"] for r in results})
    budget = f"same wall-clock budget ({config.budget_s:.0f} s)" if config.budget_s else f"{config.updates} updates"
    fig.suptitle(f"{budget}, {seeds} seeds (mean, 95% t-interval; faint: each run)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_comparison(config: CompareConfig, results: list[dict]) -> str:
    """A table, one row per method: seeds, updates, median batch seconds, greedy and sampled
    accuracy before -> after (mean +- 95% t-interval over seeds), the greedy gain over GRPO paired
    by seed, and the updates and seconds the mean curve takes to reach the best baseline's (GRPO's
    or PPO's) peak."""
    from rich import box
    from rich.table import Table

    from vinekv.compare_stats import curves, first_reaching, mean_ci, paired_difference

    by_method = {m: sorted((r for r in results if r["method"] == m), key=lambda r: r["seed"]) for m in config.methods}
    by_method = {m: runs for m, runs in by_method.items() if runs}
    aligned = all(len({tuple(c["updates"] for c in r["curve"]) for r in runs}) == 1 for runs in by_method.values())
    peak = None
    if aligned and not config.budget_s:
        means = {m: curves(runs, "greedy")[2].mean(0) for m, runs in by_method.items() if m in BASELINES}
        if means:
            best = max(means, key=lambda m: means[m].max())
            peak = (best, float(means[best].max()))
    table = Table(
        title=f"held-out accuracy, {config.eval_problems} problems", title_justify="left", box=box.SIMPLE_HEAD
    )
    for column in ("method", "seeds", "updates", "median batch", "greedy", "sampled", "greedy vs GRPO"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    if peak is not None:
        table.add_column(f"reaches {LABELS[peak[0]]}'s peak {peak[1]:.3f}", justify="right", no_wrap=True)
    grpo = by_method.get("off")
    for method, runs in by_method.items():
        first = np.array([[r["curve"][0]["greedy"], r["curve"][0]["sampled"]] for r in runs])
        last = np.array([[r["curve"][-1]["greedy"], r["curve"][-1]["sampled"]] for r in runs])
        batches = [s for r in runs for s in r["step_seconds"][1:]]  # the first batch compiles
        cells = [
            LABELS[method],
            str(len(runs)),
            f"{np.mean([r['curve'][-1]['updates'] for r in runs]):.0f}",
            f"{np.median(batches):.1f} s" if batches else "-",
            *(f"{first[:, i].mean():.3f} -> {_interval(*mean_ci(last[:, i]))}" for i in (0, 1)),
        ]
        if method != "off" and grpo and [r["seed"] for r in grpo] == [r["seed"] for r in runs]:
            cells.append(
                _interval(*paired_difference(last[:, 0], np.array([r["curve"][-1]["greedy"] for r in grpo])), "+")
            )
        else:
            cells.append("-")
        if peak is not None:
            reached = first_reaching(*_mean_curve(runs), peak[1])
            cells.append(f"{reached[0]} updates, {reached[1]:.0f} s" if reached else "never")
        table.add_row(*cells)
    table.caption = "+- : 95% t-interval over seeds (none for one seed); 'vs GRPO': paired by seed"
    return render(table)


def _interval(mean: float, half: float, sign: str = "") -> str:
    return f"{mean:{sign}.3f}" + ("" if np.isnan(half) else f" +- {half:.3f}")


def render(renderable: Any, width: int = 240) -> str:
    """A rich renderable (a table) as plain text, the same on a terminal and in a file."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in console.file.getvalue().strip("\n").splitlines())


def _mean_curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(updates [E], mean training seconds [E], mean greedy accuracy [E])`` over ``runs``."""
    from vinekv.compare_stats import curves

    updates, seconds, values = curves(runs, "greedy")
    return updates, seconds.mean(0), values.mean(0)
