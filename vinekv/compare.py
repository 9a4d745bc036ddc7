"""`vinekv compare`: GRPO vs VinePPO-Lite vs full VinePPO on the arithmetic task, same warm-up.

Every method is the same `VinePPOTrainer` (same PPO loss, epochs, batch, learning rate and
whitening) and differs only in its advantages: ``off`` is GRPO's group-normalised sequence
advantage, ``lite`` VinePPO-Lite (MC values at the anchors + mc_gae), ``full`` full VinePPO (MC
values at every step start). Each (method, seed) starts from the cached warm-up and trains
``updates`` policy updates, or until ``budget_s`` seconds of training (the same wall-clock
budget); held-out accuracy (greedy and sampled at T = 1) is measured before training and every
``eval_every`` updates, outside the timed training.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("off", "lite", "full")
LABELS = {"off": "GRPO", "lite": "VinePPO-Lite", "full": "VinePPO"}


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """What `compare` runs.

    Attributes:
      methods: subset of ``off`` (GRPO), ``lite``, ``full``.
      seeds: runs per method (seed s shuffles the training problems and seeds sampling).
      updates: policy updates per run (ignored with ``budget_s``).
      eval_every: updates between held-out evaluations.
      budget_s: if > 0, train each run for this many seconds of training time instead.
      max_updates: cap on updates with ``budget_s``.
      eval_problems, train_problems: held-out (seed 12345) and training (seed 1) problem counts.
      lite_anchor_stride: Lite's extra anchor every N response tokens (None: final anchor only).
      warmup: `vinekv.tasks.warmup.WarmupConfig` fields over its defaults (the starting policy).
      trainer: `VinePPOConfig` fields over `configs.train.DEFAULT_TRAINER` for every method.
    """

    methods: tuple[str, ...] = METHODS
    seeds: int = 3
    updates: int = 24
    eval_every: int = 6
    budget_s: float = 0.0
    max_updates: int = 400
    eval_problems: int = 200
    train_problems: int = 4000
    lite_anchor_stride: int | None = None
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
        """`vinekv train`'s settings (`DEFAULT_TRAINER`) for ``method``, KV kept in memory."""
        from configs.train import DEFAULT_TRAINER
        from vinekv.train import job_settings

        return {
            **job_settings(out, seed),
            **DEFAULT_TRAINER,
            "vineppo_mode": method,
            "vineppo_cache_strategy": "memory",
            "lite_num_branches": DEFAULT_TRAINER["vineppo_branches"],
            "lite_branch_max_len": DEFAULT_TRAINER["max_completion_length"],
            "lite_anchor_stride": self.lite_anchor_stride,
            "max_training_steps": self.max_updates if self.budget_s else self.updates,
            **self.trainer,
        }


def run_one(method: str, seed: int, config: CompareConfig, held_out: Any, train_data: Any, out: Path) -> dict:
    """One training run: its accuracy curve (``updates``, ``train_seconds``, ``greedy``,
    ``sampled`` per evaluation) and the seconds of each batch."""
    from trainer.vineppo_config import VinePPOConfig
    from trainer.vineppo_trainer import VinePPOTrainer
    from vinekv.tasks.arithmetic import reward
    from vinekv.tasks.warmup import WarmupConfig, accuracy, warm_up

    warmed = warm_up(WarmupConfig(**config.warmup), progress=False)
    settings = config.trainer_settings(method, seed, out / f"{method}-{seed}")
    trainer = VinePPOTrainer(
        arguments=VinePPOConfig(**settings),
        model=warmed.model,
        reward_funcs=reward,
        train_dataset=train_data.shuffle(seed=seed),
        processing_class=warmed.tokenizer,
    )
    updates = settings["max_training_steps"]
    curve, step_seconds = [], []
    clock = {"train": 0.0, "since": time.perf_counter()}

    def evaluate(state: Any, step: int) -> None:
        clock["train"] += time.perf_counter() - clock["since"]
        model = state.model
        curve.append(
            {
                "updates": step,
                "train_seconds": clock["train"],
                "greedy": accuracy(model, warmed.tokenizer, held_out),
                "sampled": accuracy(model, warmed.tokenizer, held_out, temperature=1.0, seed=seed),
            }
        )
        print(f"  {LABELS[method]} seed {seed}: {curve[-1]}", flush=True)
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
        trainer.close()
    return {"method": method, "seed": seed, "curve": curve, "step_seconds": step_seconds}


def compare(config: CompareConfig) -> list[dict]:
    """Every (seed, method) run of ``config``, in that order (`run_one`'s dicts)."""
    from vinekv.tasks.arithmetic import make_dataset
    from vinekv.tasks.warmup import WarmupConfig

    task = WarmupConfig(**config.warmup)
    held_out = make_dataset(config.eval_problems, 12345, steps=task.task_steps, operand_max=task.operand_max)
    train_data = make_dataset(config.train_problems, 1, steps=task.task_steps, operand_max=task.operand_max)
    results = []
    with tempfile.TemporaryDirectory(prefix="vinekv-compare-") as scratch:
        for seed in range(config.seeds):
            for method in config.methods:
                results.append(run_one(method, seed, config, held_out, train_data, Path(scratch)))
    return results


def save_results(config: CompareConfig, results: list[dict], path: Path) -> Path:
    """``results`` with the config and machine as JSON at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": platform.platform(), "config": dataclasses.asdict(config), "results": results}
    path.write_text(json.dumps(payload, indent=1))
    return path


def plot_comparison(config: CompareConfig, results: list[dict], path: Path) -> Path:
    """PNG of held-out accuracy (greedy, sampled) against updates, or training seconds with a
    budget: one faint line per run, mean +- std over seeds per method where evaluations align."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "train_seconds" if config.budget_s else "updates"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("greedy", "sampled"), strict=True):
        for i, method in enumerate(config.methods):
            runs = [r for r in results if r["method"] == method]
            for r in runs:
                ax.plot([c[key] for c in r["curve"]], [c[metric] for c in r["curve"]], color=f"C{i}", alpha=0.3)
            if key == "updates" and runs and len({len(r["curve"]) for r in runs}) == 1:
                xs = [c[key] for c in runs[0]["curve"]]
                ys = np.array([[c[metric] for c in r["curve"]] for r in runs])
                ax.errorbar(xs, ys.mean(0), yerr=ys.std(0), color=f"C{i}", marker="o", capsize=3, label=LABELS[method])
            else:
                ax.plot([], [], color=f"C{i}", label=LABELS[method])
        ax.set_xlabel("policy updates" if key == "updates" else "training seconds")
        ax.set_title(f"held-out accuracy, {metric}")
        ax.legend()
    axes[0].set_ylabel(f"accuracy ({config.eval_problems} problems)")
    budget = f"same wall-clock budget ({config.budget_s:.0f} s)"
    fig.suptitle(budget if config.budget_s else f"same updates ({config.updates})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_comparison(config: CompareConfig, results: list[dict]) -> str:
    """One line per method: updates, median batch seconds, accuracy before -> after (mean +- std)."""
    lines = []
    for method in config.methods:
        runs = [r for r in results if r["method"] == method]
        first = np.array([[r["curve"][0]["greedy"], r["curve"][0]["sampled"]] for r in runs])
        last = np.array([[r["curve"][-1]["greedy"], r["curve"][-1]["sampled"]] for r in runs])
        updates = [r["curve"][-1]["updates"] for r in runs]
        step = np.median([s for r in runs for s in r["step_seconds"][1:]] or [np.nan])
        lines.append(
            f"{LABELS[method]:13s} {len(runs)} seeds, updates {np.mean(updates):.0f}, median batch {step:.1f} s; "
            f"greedy {first[:, 0].mean():.3f} -> {last[:, 0].mean():.3f} +- {last[:, 0].std():.3f}, "
            f"sampled {first[:, 1].mean():.3f} -> {last[:, 1].mean():.3f} +- {last[:, 1].std():.3f}"
        )
    return "\n".join(lines)
