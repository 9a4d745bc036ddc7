"""The VinePPO training job: a tiny random model learns a toy reward with MC-value advantages."""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path

from configs import TrainConfig
from vinekv.demo import letter_fraction
from vinekv.models import BYTE_VOCAB, build_model, build_tokenizer

REWARD_FNS = {"letters": letter_fraction}
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
class TrainReport:
    config: TrainConfig
    history: list[dict[str, float]]
    seconds: float
    plot: str | None


def run_training(config: TrainConfig) -> TrainReport:
    """Trains per ``config`` and returns the per-step metrics."""
    from datasets import Dataset
    from transformers import GenerationConfig

    from trainer.vineppo_config import VinePPOConfig
    from trainer.vineppo_trainer import VinePPOTrainer

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="vinekv-train-"))
        model = build_model(config.family, seed=config.seed)
        model.generation_config = GenerationConfig(eos_token_id=BYTE_VOCAB, pad_token_id=BYTE_VOCAB + 1, do_sample=True)
        tokenizer = build_tokenizer()
        tokenizer.padding_side = "left"
        arguments = VinePPOConfig(
            **{
                "save_directory": str(Path(scratch) / "checkpoints"),
                "do_last_save": False,
                "use_esurge_generation": False,
                "use_wandb": False,
                "do_eval": False,
                "generation_seed": config.seed,
                "vineppo_store": config.store or str(Path(scratch) / "kv"),
                **config.trainer,
            }
        )
        every = config.step_every_chars
        trainer = VinePPOTrainer(
            arguments=arguments,
            model=model,
            reward_funcs=REWARD_FNS[config.reward],
            train_dataset=Dataset.from_dict({"prompt": list(config.prompts)}),
            processing_class=tokenizer,
            step_splitter=(lambda text: list(range(every, len(text), every))) if every else None,
        )
        trainer.train()
        plot = plot_history(trainer.history, config.plot) if config.plot else None
        return TrainReport(config, trainer.history, time.perf_counter() - start, plot)


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
    lines = [
        f"vinekv train: {cfg.family} tiny random model, vineppo_mode={args.get('vineppo_mode')}, "
        f"cache strategy {args.get('vineppo_cache_strategy')}, reward {cfg.reward}",
        "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
        *("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows),
        "",
        f"{len(report.history)} batches in {report.seconds:.1f} s" + (f"; plot: {report.plot}" if report.plot else ""),
    ]
    return "\n".join(lines)
