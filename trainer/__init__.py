"""VinePPO-Lite / full VinePPO on EasyDeL's GRPO trainer.

So far: the advantage estimators (`trainer.advantages`: `grpo_advantages`,
`vineppo_advantages`, `mc_gae`, `whiten`) and `VinePPOConfig` (`trainer.vineppo_config`).
`VinePPOTrainer` comes with the rest of the trainer issue (#5).
"""

from trainer.advantages import (
    anchor_values_to_token_values,
    fill_values,
    grpo_advantages,
    mc_gae,
    steps_to_tokens,
    vineppo_advantages,
    whiten,
)
from trainer.vineppo_config import VinePPOConfig

__all__ = [
    "VinePPOConfig",
    "anchor_values_to_token_values",
    "fill_values",
    "grpo_advantages",
    "mc_gae",
    "steps_to_tokens",
    "vineppo_advantages",
    "whiten",
]
