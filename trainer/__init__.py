"""VinePPO-Lite / full VinePPO on EasyDeL's GRPO trainer.

So far: the advantage estimators (`trainer.advantages`: `grpo_advantages`,
`vineppo_advantages`, `mc_gae`, `whiten`). `VinePPOConfig`/`VinePPOTrainer` come with the
trainer issue (#5).
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

__all__ = [
    "anchor_values_to_token_values",
    "fill_values",
    "grpo_advantages",
    "mc_gae",
    "steps_to_tokens",
    "vineppo_advantages",
    "whiten",
]
