"""Step time of VinePPO training with synchronous vs asynchronous branch replay.

    PYTHONPATH=. .venv/bin/python benchmarks/async_replay_bench.py [--batches 6] [--repeats 2]

The built-in training job (`vinekv train`'s default: full VinePPO on the arithmetic task from
the cached warm-up, K = 4, batches of 8 problems x 4 responses, 2 PPO epochs per batch, disk
cache strategy, int8 store) runs ``--batches`` batches with ``vineppo_async_replay`` off and on,
alternating, each run in a fresh process (``--repeats`` runs of each, after one discarded run
that fills the compilation cache). Asynchronous runs value batch N in a worker process while the
trainer generates batch N+1 with the policy before update N.

Reported per run: the wall time of each batch (`vineppo/step_seconds`: generation, capture and
spill, replay or the wait for the worker, the PPO updates), the first batch excluded (it
compiles, and the asynchronous run generates two batches there), and the share of it spent in
or waiting for replay. Results: benchmarks/results/async_replay.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(asynchronous: bool, batches: int, output: str) -> dict:
    from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

    silence_xla_logs()
    enable_compilation_cache()
    quiet_logs()
    from vinekv.configs import TrainConfig
    from vinekv.configs.train import DEFAULT_TRAINER
    from vinekv.train import run_training

    trainer = {
        **DEFAULT_TRAINER,
        "max_training_steps": batches * DEFAULT_TRAINER["vineppo_ppo_epochs"],
        "vineppo_keep_snapshots": False,
        "vineppo_async_replay": asynchronous,
    }
    config = TrainConfig(output=output, eval_problems=8, plot=False, checkpoints=False, trainer=trainer)
    report = run_training(config, progress=False)
    rows = [h for h in report.history if "vineppo/step_seconds" in h]
    return {
        "async": asynchronous,
        "step_seconds": [h["vineppo/step_seconds"] for h in rows],
        "replay_seconds": [h["vineppo/replay_seconds"] for h in rows],
        "wait_seconds": [h.get("vineppo/replay_wait_seconds") for h in rows],
        "worker_replay_seconds": [h.get("vineppo/worker_replay_seconds") for h in rows],
        "reward_mean": [h["vineppo/trajectory_reward_mean"] for h in rows],
    }


def run(asynchronous: bool, batches: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        code = (
            "import json, sys; sys.path.insert(0, 'benchmarks'); from async_replay_bench import child; "
            f"print('RESULT', json.dumps(child({asynchronous}, {batches}, {str(Path(folder) / 'job')!r})))"
        )
        env = {**os.environ, "PYTHONPATH": "."}
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "async_replay.json"))
    args = parser.parse_args()
    run(False, 2)  # fills the compilation cache; discarded
    runs = []
    for repeat in range(args.repeats):
        for asynchronous in (False, True) if repeat % 2 == 0 else (True, False):
            result = run(asynchronous, args.batches)
            steady = result["step_seconds"][1:]
            print(
                f"{'async' if asynchronous else 'sync '}: {statistics.mean(steady):.2f} s per batch after the first "
                f"({', '.join(f'{s:.1f}' for s in result['step_seconds'])})",
                flush=True,
            )
            runs.append(result)
    means = {
        mode: statistics.mean(s for r in runs if r["async"] == flag for s in r["step_seconds"][1:])
        for mode, flag in (("sync", False), ("async", True))
    }
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "batches": args.batches,
        "seconds_per_batch": means,
        "speedup": means["sync"] / means["async"],
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"sync {means['sync']:.2f} s, async {means['async']:.2f} s per batch: {summary['speedup']:.2f}x")


if __name__ == "__main__":
    main()
