"""Configuration of the VinePPO training job (`vinekv train`): the built-in arithmetic task."""

from __future__ import annotations

import dataclasses
from typing import Any

# Trainer settings of the built-in job: 6 batches of 8 problems x 4 responses (12 updates with 2
# PPO epochs) of full VinePPO, K = 4 branches per step start within each rollout's remaining
# 40-token budget, advantages whitened, PPO's token-mean loss, snapshots spilled to the store.
DEFAULT_TRAINER: dict[str, Any] = {
    "vineppo_mode": "full",
    "vineppo_cache_strategy": "disk",
    "vineppo_codec": "int8",
    "vineppo_branches": 4,
    "vineppo_ppo_epochs": 2,
    "vineppo_whiten_advantages": True,
    "vineppo_keep_snapshots": True,
    "max_training_steps": 12,
    "total_batch_size": 8,
    "num_return_sequences": 4,
    "max_prompt_length": 32,
    "max_completion_length": 40,
    "learning_rate": 1e-4,
    "beta": 0.0,
    "loss_type": "bnpo",
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """VinePPO on the arithmetic task, from the cached supervised warm-up, end to end.

    Attributes:
      seed: seeds the training problems and (through ``generation_seed``) the sampling keys.
      warmup: `vinekv.tasks.warmup.WarmupConfig` fields over its defaults (the policy to start
        from; cached after its first run).
      train_problems: problems the trainer draws its batches from (seed ``seed + 1``).
      eval_problems: held-out problems for the accuracy before and after (seed ``eval_seed``).
      eval_seed: seed of the held-out problems.
      output: folder of the job's store (``kv/``), checkpoints and plot.
      plot: write ``<output>/vinekv-train.png`` of the per-step metrics.
      trainer: `VinePPOConfig` fields (EasyDeL's GRPOConfig fields too), over `DEFAULT_TRAINER`.
    """

    seed: int = 0
    warmup: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_problems: int = 2000
    eval_problems: int = 200
    eval_seed: int = 12345
    output: str = "runs/train"
    plot: bool = True
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from trainer.vineppo_config import VinePPOConfig
        from vinekv.tasks.warmup import WarmupConfig

        object.__setattr__(self, "trainer", {**DEFAULT_TRAINER, **self.trainer})
        for name in ("train_problems", "eval_problems"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.output:
            raise ValueError("output must name a folder")
        known = {f.name for f in dataclasses.fields(VinePPOConfig)}
        unknown = sorted(set(self.trainer) - known)
        if unknown:
            raise ValueError(f"trainer: unknown VinePPOConfig fields {unknown}")
        warmup_fields = {f.name for f in dataclasses.fields(WarmupConfig)} - {"shape"}
        unknown = sorted(set(self.warmup) - warmup_fields)
        if unknown:
            raise ValueError(f"warmup: unknown WarmupConfig fields {unknown}; known: {sorted(warmup_fields)}")

    def warmup_config(self) -> Any:
        from vinekv.tasks.warmup import WarmupConfig

        fields = dict(self.warmup)
        if "task_steps" in fields:
            fields["task_steps"] = tuple(fields["task_steps"])
        return WarmupConfig(**fields)
