"""Per-token policy losses for `trainer.ppo_step` (pure JAX).

PPO's clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
eq. 7), per token, with ``r = exp(logp - logp_old)`` and advantage ``A`` of either sign:

    L_clip = min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)          (to maximise)
    loss   = -L_clip                                                     (to minimise)

For A > 0 this stops rewarding ``r`` above ``1 + eps_high``; for A < 0 it stops rewarding ``r``
below ``1 - eps_low`` and, where ``r > 1 + eps_high``, keeps the full gradient ``-r * A`` that
pulls the token back down.

EasyDeL 0.3.0's ``grpo_step`` (``easydel/trainers/group_relative_policy_optimization/_fn.py``,
lines 707-718) instead computes

    loss = -min(r * A, clip(r) * A)   if A >= 0
    loss = -max(r * A, clip(r) * A)   if A <  0

which agrees for A >= 0 but inverts the clip region for A < 0: no gradient where ``r`` rose above
``1 + eps_high`` despite a negative advantage, and an unclipped push where ``r < 1 - eps_low``.
`ppo_token_loss` is the textbook form for both signs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ppo_token_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    advantages: jax.Array,
    clip_low: float,
    clip_high: float,
) -> jax.Array:
    """PPO's clipped surrogate per token, as a loss to minimise.

    Args:
        logps: ``[B, T]`` log-probs of the sampled tokens under the current policy.
        old_logps: ``[B, T]`` log-probs under the policy that sampled them (no gradient needed).
        advantages: ``[B, T]`` per-token or ``[B, 1]`` per-sequence advantages (broadcast).
        clip_low, clip_high: the ratio is clipped to ``[1 - clip_low, 1 + clip_high]``.

    Returns:
        ``[B, T]``: ``-min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)``, ``r = exp(logps - old_logps)``.
    """
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    return -jnp.minimum(ratio * advantages, clipped * advantages)
