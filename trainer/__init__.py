"""VinePPO-Lite / full VinePPO on EasyDeL's GRPO trainer.

- `VinePPOConfig` (`trainer.vineppo_config`): GRPOConfig plus the plan's fields, validated.
- `VinePPOTrainer` (`trainer.vineppo_trainer`): GRPOTrainer whose advantages come from MC values.
- `estimate_values` (`trainer.value_estimation`): MC values of rollouts with the ``memory``,
  ``disk`` or ``recompute`` cache strategy.
- `PPOBaselineTrainer`, `ppo_config`, `critic_values` (`trainer.ppo_baseline`): EasyDeL's PPO with a
  value network, set up like the other methods (the paper's PPO baseline), and its critic's V(s).
- the estimators (`trainer.advantages`): `grpo_advantages`, `vineppo_advantages`, `mc_gae`,
  `trajectory_advantages`, `whiten`, `subtract_baseline`.

Names load lazily: the pure estimators import neither EasyDeL nor JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from vinekv.kvstore.process import silence_xla_logs

silence_xla_logs()  # before JAX loads: no screens of XLA CPU-feature lines (unless the user set the level)

_EXPORTS = {
    "VinePPOConfig": "vinekv.trainer.vineppo_config",
    "VinePPOTrainer": "vinekv.trainer.vineppo_trainer",
    "estimate_values": "vinekv.trainer.value_estimation",
    **{name: "vinekv.trainer.ppo_baseline" for name in ("PPOBaselineTrainer", "critic_values", "ppo_config")},
    "ppo_token_loss": "vinekv.trainer.losses",
    "Rollout": "vinekv.trainer.rollouts",
    "split_rollouts": "vinekv.trainer.rollouts",
    **{
        name: "vinekv.trainer.advantages"
        for name in (
            "anchor_values_to_token_values",
            "fill_values",
            "grpo_advantages",
            "mc_gae",
            "normalize_batch",
            "steps_to_tokens",
            "subtract_baseline",
            "trajectory_advantages",
            "vineppo_advantages",
            "whiten",
        )
    },
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
