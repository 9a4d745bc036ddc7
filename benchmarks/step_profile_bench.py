"""Where a training step's time goes: GRPO, VinePPO-Lite and full VinePPO at K = 4 and K = 9.

    PYTHONPATH=. .venv/bin/python benchmarks/step_profile_bench.py [--batches 4] [--ks 4,9]

Each configuration trains the built-in job's regime (`vinekv compare`'s settings: 32 problems x
4 responses, 2 PPO epochs, the cached warm-up, seed 0) with the ``disk`` strategy, the int8
store and each step's run kept, as `vinekv train` does, for one discarded batch (compilation) and ``--batches`` measured
ones, all in this process and in the same order. Per batch, from the trainer's metrics:
generation (EasyDeL's ``generation_time``), the rollout policy's log-probs, rollout scoring,
capture, spill, prefix reads, branch decode, branch scoring, advantages, the PPO updates (both
epochs) and the rest of the step; XLA compilations per batch (JAX's backend-compile events);
states, distinct states sampled, branches sampled, branches valuing each rollout alone would
sample, and branch tokens per rollout token.

Results: benchmarks/results/step_profile[-TAG].json and docs/img/step-profile[-TAG].png.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# (label, metric names summed) in step order; "other" is the step's wall time less their sum
PHASES = (
    ("generation", ("generation_time",)),
    ("rollout log-probs", ("vineppo/seconds/logps",)),
    ("rollout scoring", ("rewarding_time", "vineppo/seconds/rollout_score")),
    ("capture", ("vineppo/seconds/capture",)),
    ("spill", ("vineppo/seconds/spill",)),
    ("prefix reads", ("vineppo/seconds/read",)),
    ("branch decode", ("vineppo/seconds/decode",)),
    ("branch scoring", ("vineppo/seconds/score",)),
    ("advantages", ("vineppo/seconds/advantages",)),
    ("PPO update", ("update_seconds",)),
)
COUNTS = (
    "vineppo/states",
    "vineppo/sampled_states",
    "vineppo/branches",
    "vineppo/branches_saved",
    "vineppo/budget_branch_tokens_per_rollout_token",
)


class CompileCounter:
    """Counts XLA backend compilations (JAX's ``/jax/core/compile/backend_compile_duration`` events)."""

    def __init__(self) -> None:
        import jax.monitoring

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def profile(
    method: str, k: int, batches: int, counter: CompileCounter, scratch: Path, strategy: str = "disk"
) -> dict[str, Any]:
    """``batches + 1`` batches of ``method`` at K = ``k``; per batch the phase seconds, counts and
    compilations (the first batch included, marked ``warmup``)."""
    from vinekv.compare import CompareConfig, build_trainer, task_data

    epochs = 2
    config = CompareConfig(
        methods=(method,),
        seeds=1,
        updates=(batches + 1) * epochs,
        lite_anchor_stride=8,
        trainer={
            "vineppo_cache_strategy": strategy,
            "vineppo_branches": max(k, 1),  # GRPO (k = 0) samples none
            "lite_num_branches": max(k, 1),
        },
    )
    _, train_data = task_data(config)
    trainer, _ = build_trainer(method, 0, config, train_data, scratch / f"{method}-{k}")
    rows: list[dict[str, Any]] = []
    seen = {"compiles": counter.count}

    def record(state: Any, entry: dict[str, float]) -> dict[str, float]:
        compiles, seen["compiles"] = counter.count - seen["compiles"], counter.count
        phases = {label: sum(entry.get(name, 0.0) for name in names) for label, names in PHASES}
        phases["other"] = entry["vineppo/step_seconds"] - sum(phases.values())
        rows.append(
            {
                "warmup": not rows,
                "step_seconds": entry["vineppo/step_seconds"],
                "phases": phases,
                "compiles": compiles,
                "counts": {name: entry[name] for name in COUNTS if name in entry},
            }
        )
        return {}

    trainer.step_callbacks.append(record)
    try:
        trainer.train()
    finally:
        trainer.close()
    return {"method": method, "k": k, "batches": rows}


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """Means over the measured (not warm-up) batches."""
    measured = [b for b in run["batches"] if not b["warmup"]]
    mean = lambda values: float(np.mean(values))  # noqa: E731
    return {
        "step_seconds": mean([b["step_seconds"] for b in measured]),
        "phases": {name: mean([b["phases"][name] for b in measured]) for name in measured[0]["phases"]},
        "compiles_after_first": int(sum(b["compiles"] for b in measured)),
        "compiles_first": run["batches"][0]["compiles"],
        "counts": {name: mean([b["counts"][name] for b in measured]) for name in measured[0]["counts"]},
    }


def label(method: str, k: int) -> str:
    return {"off": "GRPO", "lite": f"Lite K={k}", "full": f"VinePPO K={k}"}[method]


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Stacked bars: seconds per batch by phase, per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, _ in PHASES] + ["other"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(results))
    bottom = np.zeros(len(results))
    for i, name in enumerate(names):
        height = np.array([r["summary"]["phases"][name] for r in results])
        ax.bar(x, height, bottom=bottom, label=name, color=plt.cm.tab20(i))
        bottom += height
    ax.set_xticks(x, [label(r["method"], r["k"]) for r in results])
    ax.set_ylabel("seconds per batch (128 rollouts, 2 PPO updates)")
    ax.set_title(f"where a training step's time goes; {platform.node()}, CPU only", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=4, help="measured batches per configuration (default 4)")
    parser.add_argument("--ks", default="4,9", help="branches per state of Lite and full (default 4,9)")
    parser.add_argument("--methods", default="off,lite,full", help="methods (default off,lite,full)")
    parser.add_argument("--strategy", default="disk", help="vineppo_cache_strategy (default disk; compare: memory)")
    parser.add_argument("--tag", default="", help="suffix of the result files (default none)")
    args = parser.parse_args()
    quiet_logs()
    enable_compilation_cache()
    counter = CompileCounter()
    runs = [(m, 0) if m == "off" else (m, int(k)) for m in args.methods.split(",") for k in args.ks.split(",")]
    runs = list(dict.fromkeys(runs))  # GRPO once
    suffix = f"-{args.tag}" if args.tag else ""
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vinekv-step-profile-") as scratch:
        for method, k in runs:
            run = profile(method, k, args.batches, counter, Path(scratch), args.strategy)
            run["summary"] = summary(run)
            results.append(run)
            print(f"{label(method, k)}: {run['summary']['step_seconds']:.2f} s per batch", flush=True)
    out = ROOT / "benchmarks" / "results" / f"step_profile{suffix}.json"
    out.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "command": "benchmarks/step_profile_bench.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
                "seconds": time.perf_counter() - start,
                "results": results,
            },
            indent=1,
        )
    )
    plot(results, ROOT / "docs" / "img" / f"step-profile{suffix}.png")
    print(format_table(results))


def format_table(results: list[dict[str, Any]]) -> str:
    """Markdown table: seconds per phase, step total and ratio to GRPO, compilations, counts."""
    names = [name for name, _ in PHASES] + ["other"]
    grpo = next((r["summary"]["step_seconds"] for r in results if r["method"] == "off"), None)
    head = ["phase (s per batch)"] + [label(r["method"], r["k"]) for r in results]
    lines = ["| " + " | ".join(head) + " |", "| :--- |" + " ---: |" * len(results)]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{r['summary']['phases'][name]:.2f}" for r in results) + " |")
    lines.append("| **step** | " + " | ".join(f"**{r['summary']['step_seconds']:.2f}**" for r in results) + " |")
    if grpo:
        lines.append("| x GRPO | " + " | ".join(f"{r['summary']['step_seconds'] / grpo:.2f}" for r in results) + " |")
    lines.append(
        "| compilations, first / later batches | "
        + " | ".join(f"{r['summary']['compiles_first']} / {r['summary']['compiles_after_first']}" for r in results)
        + " |"
    )
    for name in COUNTS:
        cells = [r["summary"]["counts"].get(name) for r in results]
        lines.append(f"| {name} | " + " | ".join("" if c is None else f"{c:.2f}" for c in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
