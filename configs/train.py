"""Configuration of the VinePPO training job (`vinekv train`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from configs.demo import DemoConfig
from vinekv.models import FAMILIES

REWARDS = ("letters",)
# Trainer settings of the built-in job: 6 updates (3 batches x 2 PPO epochs) of full VinePPO on
# 2 prompts x 4 responses of 32 tokens, K = 4 branches of 16 tokens at up to 4 step starts each.
DEFAULT_TRAINER: dict[str, Any] = {
    "vineppo_mode": "full",
    "vineppo_cache_strategy": "disk",
    "vineppo_codec": "int8",
    "vineppo_branches": 4,
    "vineppo_max_depth": 16,
    "vineppo_max_states": 4,
    "vineppo_unfinished_reward": None,  # a random model rarely ends a branch: score truncated ones
    "vineppo_ppo_epochs": 2,
    "max_training_steps": 6,
    "total_batch_size": 2,
    "num_return_sequences": 4,
    "max_prompt_length": 64,
    "max_completion_length": 32,
    "learning_rate": 1e-4,
    "beta": 0.0,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """VinePPO on a tiny random model with a toy reward: the whole training loop, end to end.

    Attributes:
      family: model family of the tiny random model.
      seed: seeds the model weights (and, through ``generation_seed``, the sampling keys).
      prompts: prompt texts; each step takes ``total_batch_size`` of them.
      reward: ``letters`` (fraction of ASCII letters in the completion).
      step_every_chars: full mode: a reasoning step every this many characters (a random model
        writes no natural step delimiters); 0 uses ``vineppo_step_delimiter``.
      store: snapshot store path for ``disk``; empty for a temporary one.
      plot: PNG of the per-step metrics; empty for none.
      trainer: `VinePPOConfig` fields (EasyDeL's GRPOConfig fields too), over `DEFAULT_TRAINER`.
    """

    family: str = "llama"
    seed: int = 0
    prompts: tuple[str, ...] = DemoConfig.prompts
    reward: str = "letters"
    step_every_chars: int = 8
    store: str = ""
    plot: str = "vinekv-train.png"
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from trainer.vineppo_config import VinePPOConfig

        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "trainer", {**DEFAULT_TRAINER, **self.trainer})
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if not self.prompts or any(not p for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings")
        if self.reward not in REWARDS:
            raise ValueError(f"reward must be one of {REWARDS}, got {self.reward!r}")
        if self.step_every_chars < 0:
            raise ValueError(f"step_every_chars must be >= 0, got {self.step_every_chars}")
        known = {f.name for f in dataclasses.fields(VinePPOConfig)}
        unknown = sorted(set(self.trainer) - known)
        if unknown:
            raise ValueError(f"trainer: unknown VinePPOConfig fields {unknown}")
