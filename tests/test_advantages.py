"""Advantage estimators against the hand-worked examples of docs/advantages.md."""

from __future__ import annotations

import numpy as np
import pytest

from vinekv.trainer.advantages import (
    anchor_values_to_token_values,
    fill_values,
    grpo_advantages,
    mc_gae,
    normalize_batch,
    steps_to_tokens,
    subtract_baseline,
    trajectory_advantages,
    vineppo_advantages,
    whiten,
)


def test_grpo_matches_easydel_formula():
    got = grpo_advantages(np.array([1.0, 0, 0, 1, 1, 1]), group_size=3)
    std = np.sqrt(2 / 9)
    np.testing.assert_allclose(got, [(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), 0, 0, 0])
    np.testing.assert_allclose(grpo_advantages(np.array([1.0, 0, 0, 1]), 2, scale="none"), [0.5, -0.5, -0.5, 0.5])
    np.testing.assert_allclose(
        grpo_advantages(np.array([1.0, 0, 0, 1]), 2, scale="batch"), np.array([0.5, -0.5, -0.5, 0.5]) / (0.5 + 1e-4)
    )
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        grpo_advantages(np.zeros(6), 4)


def test_vineppo_worked_example():
    values, rewards = np.array([0.5, np.nan, 0.8]), np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(fill_values(values, rewards, 1.0), [0.5, 0.8, 0.8])
    np.testing.assert_allclose(vineppo_advantages(values, rewards, 1.0), [0.3, 0.0, 0.2])
    np.testing.assert_allclose(fill_values(values, rewards, 0.9), [0.5, 0.72, 0.8])
    np.testing.assert_allclose(vineppo_advantages(values, rewards, 0.9), [0.148, 0.0, 0.2])
    # every token of step j gets A_j
    np.testing.assert_allclose(
        steps_to_tokens(np.array([0.3, 0.0, 0.2]), np.array([0, 2, 5]), 7), [0.3, 0.3, 0.0, 0.0, 0.0, 0.2, 0.2]
    )


def test_vineppo_edge_cases():
    # one step: A_0 = r_0 - V(s_0)
    np.testing.assert_allclose(vineppo_advantages(np.array([0.25]), np.array([1.0])), [0.75])
    # truncated response (no final reward): the last step is pushed down by its own value
    np.testing.assert_allclose(vineppo_advantages(np.array([0.4, 0.6]), np.zeros(2)), [0.2, -0.6])
    # no estimate at all: values come from the rewards alone and advantages vanish
    np.testing.assert_allclose(vineppo_advantages(np.array([np.nan, np.nan]), np.array([0.0, 1.0])), [0.0, 0.0])
    with pytest.raises(ValueError, match="must rise strictly from 0"):
        steps_to_tokens(np.zeros(3), np.array([0, 2, 2]), 5)  # an empty step
    with pytest.raises(ValueError, match="same \\[S\\] shape"):
        vineppo_advantages(np.zeros(2), np.zeros(3))


def test_mc_gae_worked_example():
    anchors, values, rewards = np.array([0, 4]), np.array([0.4, 0.9]), np.array([0.0, 0, 0, 0, 1])
    np.testing.assert_allclose(anchor_values_to_token_values(anchors, values, 5), [0.4, 0.525, 0.65, 0.775, 0.9])
    np.testing.assert_allclose(
        mc_gae(anchors, values, rewards, gamma=1.0, lam=0.5), [0.240625, 0.23125, 0.2125, 0.175, 0.1]
    )
    # Lite default: one anchor at the final token
    np.testing.assert_allclose(
        mc_gae(np.array([4]), np.array([0.9]), rewards, gamma=1.0, lam=0.5), [0.00625, 0.0125, 0.025, 0.05, 0.1]
    )
    # lam = 1, gamma = 1: A_t = return - V_t
    np.testing.assert_allclose(
        mc_gae(anchors, values, rewards, 1.0, 1.0), 1.0 - np.array([0.4, 0.525, 0.65, 0.775, 0.9])
    )
    # an anchor before the end interpolates to V_T = 0 after it
    # after the last anchor its value is held: no spurious TD errors before the last token
    np.testing.assert_allclose(anchor_values_to_token_values(np.array([1]), np.array([0.6]), 4), [0.6] * 4)
    np.testing.assert_allclose(
        mc_gae(np.array([1]), np.array([0.6]), np.array([0, 0, 0, 1.0]), gamma=1.0, lam=0.5), [0.05, 0.1, 0.2, 0.4]
    )
    # a one-token response
    np.testing.assert_allclose(mc_gae(np.array([0]), np.array([0.3]), np.array([1.0])), [0.7])
    with pytest.raises(ValueError, match="must rise strictly within"):
        mc_gae(np.array([3, 1]), np.array([0.1, 0.2]), rewards)


def test_whiten():
    got = whiten(np.array([1.0, 2.0, 3.0, 100.0]), mask=np.array([True, True, True, False]))
    np.testing.assert_allclose(got, [-1.2247, 0.0, 1.2247, 0.0], atol=1e-4)


def test_trajectory_advantages_full_by_hand():
    # steps start at tokens 0, 2, 4 of a 5-token response; the last state has no estimate, so it
    # is filled backwards: V(s_2) = r_2 + V(s_3) = 1. A = (0 + .8 - .5, 0 + 1 - .8, 1 + 0 - 1).
    adv = trajectory_advantages("full", 5, np.array([0, 2, 4]), np.array([0.5, 0.8, np.nan]), reward=1.0)
    np.testing.assert_allclose(adv, [0.3, 0.3, 0.2, 0.2, 0.0])


def test_trajectory_advantages_lite_by_hand():
    # one anchor at the last token (V = .6 everywhere), reward 1, lambda .5:
    # deltas (0, 0, .4) -> A = (.1, .2, .4)
    adv = trajectory_advantages("lite", 3, np.array([2]), np.array([0.6]), reward=1.0, gamma=1.0, lam=0.5)
    np.testing.assert_allclose(adv, [0.1, 0.2, 0.4])
    with pytest.raises(ValueError, match="mode must be 'full' or 'lite'"):
        trajectory_advantages("off", 3, np.array([2]), np.array([0.6]), reward=1.0)


def test_one_token_response_gets_reward_minus_value():
    for mode in ("full", "lite"):
        np.testing.assert_allclose(trajectory_advantages(mode, 1, np.array([0]), np.array([0.25]), 1.0), [0.75])


def test_subtract_baseline_uses_masked_entries_only():
    adv = np.array([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(subtract_baseline(adv, mask), [[-1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])


def test_normalize_batch_zeroes_padding_then_baselines_and_whitens():
    adv = np.array([[1.0, 3.0, 7.0], [2.0, 7.0, 7.0]])
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(normalize_batch(adv, mask), [[1.0, 3.0, 0.0], [2.0, 0.0, 0.0]])
    np.testing.assert_allclose(normalize_batch(adv, mask, "batch"), [[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    white = normalize_batch(adv, mask, "batch", whiten_advantages=True)
    picked = white[mask.astype(bool)]
    np.testing.assert_allclose([picked.mean(), picked.std()], [0.0, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="baseline must be"):
        normalize_batch(adv, mask, "learned")


def test_capped_states_per_rule_as_documented():
    """docs/advantages.md, "Capped states": five steps, N = 2, reward 1, gamma 1."""
    from vinekv.replay.steps import valued_states

    uncapped = np.array([0.4, 0.5, 0.7, 0.6, 0.9])
    rewards = np.array([0, 0, 0, 0, 1.0])
    np.testing.assert_allclose(vineppo_advantages(uncapped, rewards), [0.1, 0.2, -0.1, 0.3, 0.1], atol=1e-12)
    entropy = np.array([0.0, 0.2, 1.5, 0.3, 0.1])
    expected = {"first": [0.1, 0.5, 0, 0, 0], "spread": [0.5, 0, 0, 0, 0.1], "entropy": [0.3, 0, 0.3, 0, 0]}
    for rule, want in expected.items():
        valued = valued_states(5, 2, rule, entropy)
        got = vineppo_advantages(np.where(valued, uncapped, np.nan), rewards)
        np.testing.assert_allclose(got, want, atol=1e-12, err_msg=rule)
