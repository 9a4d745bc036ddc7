"""GRPO vs VinePPO-Lite vs full VinePPO on the arithmetic task, from the same warm-up.

    PYTHONPATH=. .venv/bin/python benchmarks/compare_bench.py [--seeds 3] [--updates 24] [--budget-s 0]

Every method is the same `VinePPOTrainer` (same PPO loss, epochs, batch, learning rate and
whitening) and differs only in its advantages: ``off`` is GRPO's group-normalised sequence
advantage, ``lite`` VinePPO-Lite (MC value at the final anchor + mc_gae), ``full`` full VinePPO
(MC values at every step start). Each (method, seed) starts from the cached warm-up and trains
``--updates`` policy updates; held-out accuracy (200 problems, greedy and sampled at T = 1) is
measured before training and after every ``--eval-every`` updates, outside the timed training.
With ``--budget-s S`` every run instead trains until S seconds of training time (the same
wall-clock budget), up to ``--max-updates``.

Results: benchmarks/results/compare[-budget].json and docs/img/compare_*.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("off", "lite", "full")
LABELS = {"off": "GRPO", "lite": "VinePPO-Lite", "full": "VinePPO"}


def trainer_settings(method: str, seed: int, updates: int, out: Path) -> dict:
    """`vinekv train`'s settings (`DEFAULT_TRAINER`) for ``method``, KV kept in memory."""
    from configs.train import DEFAULT_TRAINER
    from vinekv.train import job_settings

    return {
        **job_settings(out, seed),
        **DEFAULT_TRAINER,
        "vineppo_mode": method,
        "vineppo_cache_strategy": "memory",
        "lite_num_branches": 4,
        "lite_branch_max_len": 40,
        "max_training_steps": updates,
    }


def run_one(method: str, seed: int, args: argparse.Namespace, held_out, train_data, out: Path) -> dict:
    """One training run; returns its accuracy curve against updates and training seconds."""
    from trainer.vineppo_config import VinePPOConfig
    from trainer.vineppo_trainer import VinePPOTrainer
    from vinekv.tasks.arithmetic import reward
    from vinekv.tasks.warmup import WarmupConfig, accuracy, warm_up

    warmed = warm_up(WarmupConfig(), progress=False)
    updates = args.max_updates if args.budget_s else args.updates
    trainer = VinePPOTrainer(
        arguments=VinePPOConfig(**trainer_settings(method, seed, updates, out / f"{method}-{seed}")),
        model=warmed.model,
        reward_funcs=reward,
        train_dataset=train_data.shuffle(seed=seed),
        processing_class=warmed.tokenizer,
    )
    curve = []
    clock = {"train": 0.0, "since": time.perf_counter()}

    def evaluate(state, step: int) -> None:
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
        print(f"  {method} seed {seed}: {curve[-1]}", flush=True)
        clock["since"] = time.perf_counter()

    execute = trainer._execute_train_step
    step_seconds = []

    def execute_and_evaluate(state, batch):
        start = time.perf_counter()
        state, metrics, error = execute(state, batch)
        step_seconds.append(time.perf_counter() - start)
        step = int(np.asarray(state.step))
        over_budget = args.budget_s and clock["train"] + time.perf_counter() - clock["since"] >= args.budget_s
        if step % args.eval_every == 0 or step >= updates or over_budget:
            evaluate(state, step)
        if over_budget:
            trainer.max_training_steps = step  # the training loop stops at its next check
        return state, metrics, error

    trainer._execute_train_step = execute_and_evaluate
    evaluate(trainer.model_state, 0)
    trainer.train()
    return {"method": method, "seed": seed, "curve": curve, "step_seconds": step_seconds}


def plot(results: list[dict], key: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, metric in zip(axes, ("greedy", "sampled"), strict=True):
        for i, method in enumerate(METHODS):
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
    axes[0].set_ylabel("accuracy (200 problems)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    parser.add_argument("--updates", type=int, default=24, help="policy updates per run (default 24)")
    parser.add_argument("--eval-every", type=int, default=6, help="updates between evaluations (default 6)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="train for this many seconds instead")
    parser.add_argument("--max-updates", type=int, default=400, help="cap on updates with --budget-s")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of off,lite,full")
    args = parser.parse_args()
    quiet_logs()
    enable_compilation_cache(ROOT / ".jax_cache")
    import tempfile

    from vinekv.tasks.arithmetic import make_dataset

    held_out = make_dataset(200, seed=12345)
    train_data = make_dataset(4000, seed=1)
    results = []
    with tempfile.TemporaryDirectory(prefix="vinekv-compare-") as scratch:
        for seed in range(args.seeds):
            for method in args.methods.split(","):
                results.append(run_one(method, seed, args, held_out, train_data, Path(scratch)))
    tag = "-budget" if args.budget_s else ""
    out = ROOT / "benchmarks" / "results" / f"compare{tag}.json"
    out.write_text(json.dumps({"machine": platform.platform(), "args": vars(args), "results": results}, indent=1))
    key = "train_seconds" if args.budget_s else "updates"
    title = f"same wall-clock budget ({args.budget_s:.0f} s)" if args.budget_s else f"same updates ({args.updates})"
    plot(results, key, ROOT / "docs" / "img" / f"compare{tag}.png", title)
    for method in args.methods.split(","):
        runs = [r for r in results if r["method"] == method]
        first = np.array([[r["curve"][0]["greedy"], r["curve"][0]["sampled"]] for r in runs])
        last = np.array([[r["curve"][-1]["greedy"], r["curve"][-1]["sampled"]] for r in runs])
        updates = [r["curve"][-1]["updates"] for r in runs]
        step = np.median([s for r in runs for s in r["step_seconds"][1:]] or [np.nan])
        print(
            f"{LABELS[method]:13s} updates {np.mean(updates):.0f}, median batch {step:.1f} s; greedy "
            f"{first[:, 0].mean():.3f} -> {last[:, 0].mean():.3f} +- {last[:, 0].std():.3f}, sampled "
            f"{first[:, 1].mean():.3f} -> {last[:, 1].mean():.3f} +- {last[:, 1].std():.3f}"
        )


if __name__ == "__main__":
    main()
