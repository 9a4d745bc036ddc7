"""The sweep that chose `vinekv train`'s regime: GRPO from the cached warm-up under several batch
sizes and learning rates, with held-out accuracy and the update's diagnostics per window.

    PYTHONPATH=. .venv/bin/python benchmarks/regime_sweep.py [--only NAME ...] [--updates 120]

Each configuration trains GRPO (``vineppo_mode='off'``, the same `VinePPOTrainer` and settings as
`vinekv compare`, `vinekv.configs.train.DEFAULT_TRAINER` underneath) and prints, every ``--eval-every``
updates: held-out greedy and sampled accuracy (``--eval-problems`` problems), and over the window
the rollouts' mean reward, policy entropy per token, KL(old || new) per token, clip fraction and
the largest PPO ratio. Results go to benchmarks/results/regime-sweep.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

ROOT = Path(__file__).resolve().parent.parent

CONSTANT = {"scheduler": "none", "warmup_steps": 0, "learning_rate_end": None, "clip_grad": None}
WARMED = {"scheduler": "linear", "warmup_steps": 20, "clip_grad": 1.0}
CONFIGS: dict[str, dict] = {
    "8x4-lr1e-4": {**CONSTANT, "total_batch_size": 8, "learning_rate": 1e-4},
    "8x4-lr3e-4": {**CONSTANT, "total_batch_size": 8, "learning_rate": 3e-4},
    "8x4-lr3e-4-warm40": {
        **WARMED,
        "warmup_steps": 40,
        "total_batch_size": 8,
        "learning_rate": 3e-4,
        "learning_rate_end": 3e-4,
    },
    "16x8-lr3e-4-warm40": {
        **WARMED,
        "warmup_steps": 40,
        "total_batch_size": 16,
        "num_return_sequences": 8,
        "learning_rate": 3e-4,
        "learning_rate_end": 3e-4,
    },
    "32x4-lr1e-4-warm20": {**WARMED, "total_batch_size": 32, "learning_rate": 1e-4, "learning_rate_end": 1e-4},
}
WINDOW = (
    ("reward", "reward_mean"),
    ("entropy", "mean_entropy"),
    ("kl", "policy_kl"),
    ("clip", "clip_ratio/region_mean"),
    ("ratio_max", "ratio/max"),
)


def run(name: str, trainer: dict, updates: int, eval_every: int, eval_problems: int) -> dict:
    import numpy as np

    from vinekv.compare import CompareConfig
    from vinekv.tasks.arithmetic import make_dataset, reward
    from vinekv.tasks.warmup import accuracy, warm_up
    from vinekv.trainer.vineppo_config import VinePPOConfig
    from vinekv.trainer.vineppo_trainer import VinePPOTrainer

    config = CompareConfig(methods=("off",), seeds=1, updates=updates, eval_problems=eval_problems, trainer=trainer)
    held_out = make_dataset(eval_problems, 12345)
    warmed = warm_up(progress=False)
    settings = config.trainer_settings("off", 0, ROOT / "runs" / "regime-sweep" / name)
    vine = VinePPOTrainer(
        arguments=VinePPOConfig(**settings),
        model=warmed.model,
        reward_funcs=reward,
        train_dataset=make_dataset(config.train_problems, 1).shuffle(seed=0),
        processing_class=warmed.tokenizer,
    )
    rows, start = [], time.perf_counter()

    def evaluate(state, entry):
        step = int(entry["step"])
        if step % eval_every:
            return None
        window = [h for h in vine.history if h["step"] > step - eval_every] + [entry]
        row = {
            "updates": step,
            "seconds": time.perf_counter() - start,
            "greedy": accuracy(state.model, warmed.tokenizer, held_out),
            "sampled": accuracy(state.model, warmed.tokenizer, held_out, temperature=1.0),
            **{label: float(np.nanmean([h.get(key, np.nan) for h in window])) for label, key in WINDOW},
        }
        rows.append(row)
        print(f"  {name} " + " ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
        return None

    vine.step_callbacks.append(evaluate)
    first = {
        "updates": 0,
        "greedy": accuracy(warmed.model, warmed.tokenizer, held_out),
        "sampled": accuracy(warmed.model, warmed.tokenizer, held_out, temperature=1.0),
    }
    print(f"  {name} start {first}", flush=True)
    try:
        vine.train()
    finally:
        vine.close()
    return {"name": name, "trainer": trainer, "start": first, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="configurations to run (default all)")
    parser.add_argument("--updates", type=int, default=120, help="policy updates per configuration (default 120)")
    parser.add_argument("--eval-every", type=int, default=20, help="updates per window (default 20)")
    parser.add_argument("--eval-problems", type=int, default=400, help="held-out problems (default 400)")
    args = parser.parse_args()
    quiet_logs()
    enable_compilation_cache()
    results = [
        run(name, CONFIGS[name], args.updates, args.eval_every, args.eval_problems) for name in (args.only or CONFIGS)
    ]
    out = ROOT / "benchmarks" / "results" / "regime-sweep.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
