"""Advantage estimators: GRPO's group-normalised baseline, full VinePPO, and VinePPO-Lite's mc_gae.

grpo (as EasyDeL 0.3.0 computes it), rewards ``r`` ``[groups * G]``:

    A_i = (r_i - mean_group(r)) / (std_group(r) + eps)       std: population std (ddof 0)

``scale="batch"`` uses the std over the whole batch, ``"none"`` does not divide.

vineppo (full), one response of S steps with MC values ``V(s_j)`` at the step starts and the
reward ``r_j`` of each step (usually 0 except the final one):

    V(s_S) = 0
    A_j = r_j + gamma * V(s_{j+1}) - V(s_j)

States without an estimate (NaN, e.g. past a cap on states) are filled backwards first, as the
VinePPO reference does: ``V(s_i) = r_i + gamma * V(s_{i+1})``. Every token of step j gets A_j.

mc_gae (Lite): MC values at anchor token positions, token rewards ``r_t`` ``[T]``. Token-level
values ``V_t`` (of the state before token t) are linear interpolations between consecutive
anchors, the first anchor's value before it and the last anchor's value after it (nothing is
known about the later states; the terminal ``V_T = 0`` enters through the last token's TD
error). Then GAE:

    delta_t = r_t + gamma * V_{t+1} - V_t,     V_T = 0
    A_t     = sum_{l >= 0} (gamma * lam)^l * delta_{t+l}

docs/advantages.md works both estimators through by hand.
"""

from __future__ import annotations

import numpy as np

# The method each ``vineppo_mode`` trains with, named by its advantages.
METHOD_NAMES = {"off": "GRPO", "lite": "VinePPO-Lite", "full": "VinePPO"}


def grpo_advantages(rewards: np.ndarray, group_size: int, scale: str = "group", eps: float = 1e-4) -> np.ndarray:
    """Group-normalised sequence advantages ``[N]`` for rewards ``[N]`` in groups of ``group_size``."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if group_size < 1 or rewards.ndim != 1 or rewards.size % group_size:
        raise ValueError(f"rewards of shape {rewards.shape} do not split into groups of {group_size}")
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    grouped = rewards.reshape(-1, group_size)
    centred = (grouped - grouped.mean(axis=1, keepdims=True)).ravel()
    if scale == "none":
        return centred
    std = np.repeat(grouped.std(axis=1), group_size) if scale == "group" else np.full(rewards.size, rewards.std())
    return centred / (std + eps)


def fill_values(values: np.ndarray, step_rewards: np.ndarray, gamma: float) -> np.ndarray:
    """``[S]`` values with NaNs filled backwards: ``V_i = r_i + gamma * V_{i+1}``, ``V_S = 0``."""
    values = np.asarray(values, dtype=np.float64).copy()
    rewards = np.asarray(step_rewards, dtype=np.float64)
    if values.shape != rewards.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and step_rewards {rewards.shape} must be the same [S] shape")
    following = 0.0
    for i in range(values.size - 1, -1, -1):
        if np.isnan(values[i]):
            values[i] = rewards[i] + gamma * following
        following = values[i]
    return values


def vineppo_advantages(values: np.ndarray, step_rewards: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """Step advantages ``[S]``: ``A_j = r_j + gamma * V(s_{j+1}) - V(s_j)``, ``V(s_S) = 0``."""
    filled = fill_values(values, step_rewards, gamma)
    following = np.append(filled[1:], 0.0)
    return np.asarray(step_rewards, dtype=np.float64) + gamma * following - filled


def steps_to_tokens(step_values: np.ndarray, step_starts: np.ndarray, response_len: int) -> np.ndarray:
    """``[T]``: token t gets the value of the step containing it (steps start at ``step_starts``)."""
    starts = np.asarray(step_starts, dtype=np.int64)
    if starts.size == 0 or starts[0] != 0 or np.any(np.diff(starts) <= 0) or starts[-1] >= response_len:
        raise ValueError(f"step_starts {starts.tolist()} must rise strictly from 0 and stay below {response_len}")
    step_of_token = np.searchsorted(starts, np.arange(response_len), side="right") - 1
    return np.asarray(step_values, dtype=np.float64)[step_of_token]


def anchor_values_to_token_values(anchors: np.ndarray, anchor_values: np.ndarray, response_len: int) -> np.ndarray:
    """Token values ``V_t`` ``[T]`` from MC values at anchor positions.

    Linear interpolation between consecutive anchors; before the first anchor, the first
    anchor's value; after the last anchor, the last anchor's value (so with a single anchor every
    token holds its value). Decaying towards ``V_T = 0`` instead would put a TD error of
    ``-V / (T - anchor)`` on every token after the anchor: with the final anchor before the last
    content token and an EOS after it, a correct response's tokens got negative advantages.
    """
    anchors = np.asarray(anchors, dtype=np.int64)
    values = np.asarray(anchor_values, dtype=np.float64)
    if anchors.size == 0 or anchors.shape != values.shape:
        raise ValueError(f"need one value per anchor, got anchors {anchors.shape} and values {values.shape}")
    if np.any(np.diff(anchors) <= 0) or anchors[0] < 0 or anchors[-1] >= response_len:
        raise ValueError(f"anchors {anchors.tolist()} must rise strictly within [0, {response_len})")
    return np.interp(np.arange(response_len), anchors, values)  # holds the end values outside


def mc_gae(
    anchors: np.ndarray,
    anchor_values: np.ndarray,
    token_rewards: np.ndarray,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> np.ndarray:
    """Token advantages ``[T]``: GAE(gamma, lam) over values bootstrapped from MC anchors."""
    rewards = np.asarray(token_rewards, dtype=np.float64)
    if rewards.ndim != 1 or rewards.size == 0:
        raise ValueError(f"token_rewards must be a non-empty [T] array, got shape {rewards.shape}")
    values = anchor_values_to_token_values(anchors, anchor_values, rewards.size)
    following = np.append(values[1:], 0.0)
    deltas = rewards + gamma * following - values
    advantages = np.empty_like(deltas)
    running = 0.0
    for i in range(deltas.size - 1, -1, -1):
        running = deltas[i] + gamma * lam * running
        advantages[i] = running
    return advantages


def whiten(advantages: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-8) -> np.ndarray:
    """``(A - mean) / (std + eps)`` over the entries where ``mask`` (default: all); others stay 0."""
    advantages = np.asarray(advantages, dtype=np.float64)
    mask = np.ones(advantages.shape, bool) if mask is None else np.asarray(mask, bool)
    picked = advantages[mask]
    if picked.size == 0:
        return np.zeros_like(advantages)
    return np.where(mask, (advantages - picked.mean()) / (picked.std() + eps), 0.0)


def trajectory_advantages(
    mode: str,
    response_len: int,
    positions: np.ndarray,
    values: np.ndarray,
    reward: float,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> np.ndarray:
    """Token advantages ``[T]`` of one response whose only reward ``reward`` comes at its end.

    ``full``: ``positions`` are the step starts and ``values`` their MC values (NaN where not
    estimated): `vineppo_advantages`, each token getting its step's advantage. ``lite``:
    ``positions`` are the anchors: `mc_gae`.
    """
    rewards_at = np.zeros(len(positions) if mode == "full" else response_len)
    rewards_at[-1] = reward
    if mode == "full":
        return steps_to_tokens(vineppo_advantages(values, rewards_at, gamma), positions, response_len)
    if mode == "lite":
        return mc_gae(positions, values, rewards_at, gamma, lam)
    raise ValueError(f"mode must be 'full' or 'lite', got {mode!r}")


def subtract_baseline(advantages: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``A - mean(A)`` over the entries where ``mask`` (a batch baseline); others stay 0."""
    advantages = np.asarray(advantages, dtype=np.float64)
    mask = np.ones(advantages.shape, bool) if mask is None else np.asarray(mask, bool)
    picked = advantages[mask]
    return np.where(mask, advantages - (picked.mean() if picked.size else 0.0), 0.0)


def normalize_batch(
    advantages: np.ndarray, mask: np.ndarray, baseline: str = "none", whiten_advantages: bool = False
) -> np.ndarray:
    """``[N, T]`` token advantages zeroed off ``mask``, then optionally baselined and whitened
    over the masked entries (``baseline``: ``"none"`` or ``"batch"``)."""
    mask = np.asarray(mask, bool)
    out = np.where(mask, np.asarray(advantages, dtype=np.float64), 0.0)
    if baseline not in ("none", "batch"):
        raise ValueError(f"baseline must be 'none' or 'batch', got {baseline!r}")
    if baseline == "batch":
        out = subtract_baseline(out, mask)
    if whiten_advantages:
        out = whiten(out, mask)
    return out
