"""Pure replay math: step splitting, state selection, MC values, reward scoring (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from vinekv.replay.branch_replay import ReplayConfig, replay_batches
from vinekv.replay.rewards import score
from vinekv.replay.steps import content_length, lite_anchors, split_points, step_starts, token_boundaries, valued_states
from vinekv.replay.values import MCRecord, branch_returns, branches_wanted, mc_values, ragged


def test_split_points_and_token_boundaries():
    text = "a=1\nb=2\n\nc"
    assert split_points(text) == [4, 8, 9]
    assert split_points("x\n") == []  # a trailing delimiter ends the last step, it starts none
    # byte-level tokens: one per character
    offsets = [(i, i + 1) for i in range(len(text))]
    np.testing.assert_array_equal(step_starts(text, offsets), [0, 4, 8, 9])
    # a token straddling a split point stays in the earlier step; two points in one token count once
    merged = [(0, 2), (2, 5), (5, 9), (9, 10)]  # "a=", "1\nb", "=2\n\n", "c"
    np.testing.assert_array_equal(token_boundaries([4, 8, 9], merged), [2, 3])
    np.testing.assert_array_equal(step_starts(text, offsets, splitter=lambda t: [2, 6]), [0, 2, 6])
    with pytest.raises(ValueError, match="delimiter must be a non-empty string"):
        split_points(text, "")


def test_valued_states_per_rule():
    n = 6  # step starts [0, 3, 7, 12, 20, 31], say
    assert valued_states(n, None).all() and valued_states(n, 6, "spread").all()
    np.testing.assert_array_equal(np.flatnonzero(valued_states(n, 3)), [0, 1, 2])  # first: the reference's
    np.testing.assert_array_equal(np.flatnonzero(valued_states(n, 3, "spread")), [0, 2, 5])  # round(0, 2.5, 5)
    entropy = np.array([0, 5, 1, 9, 2, 0.0])
    np.testing.assert_array_equal(np.flatnonzero(valued_states(n, 3, "entropy", entropy)), [0, 1, 3])
    np.testing.assert_array_equal(np.flatnonzero(valued_states(n, 1, "entropy", entropy)), [0])
    with pytest.raises(ValueError, match="needs one entropy per step start"):
        valued_states(n, 3, "entropy")
    with pytest.raises(ValueError, match="must be one of"):
        valued_states(n, 3, "random")


def test_content_length_strips_trailing_special_tokens():
    assert content_length([5, 10, 256], [256, 257]) == 2
    assert content_length([5, 256, 10, 256, 257, 257], [256, 257]) == 3  # only the trailing run
    assert content_length([256], [256]) == 0 and content_length([], [256]) == 0


def test_lite_anchors():
    np.testing.assert_array_equal(lite_anchors(10), [9])
    np.testing.assert_array_equal(lite_anchors(10, stride=4), [0, 4, 8, 9])
    np.testing.assert_array_equal(lite_anchors(8, quartiles=True), [0, 2, 4, 6, 7])
    with pytest.raises(ValueError, match="response_len must be >= 1"):
        lite_anchors(0)


def test_mc_values_hand_computed():
    # state 0: returns 1, 0, 1, 1 -> mean 0.75, var (3*0.0625 + 0.5625)/3 = 0.25, stderr 0.25
    # state 1: branch 2 was cut off (reward 1 ignored -> unfinished_reward -0.5)
    rewards = np.array([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    finished = np.array([[True, True, True, True], [True, True, False, True]])
    returns = branch_returns(rewards, finished, unfinished_reward=-0.5)
    np.testing.assert_array_equal(returns[1], [0.0, 0.0, -0.5, 1.0])
    np.testing.assert_array_equal(branch_returns(rewards, finished, unfinished_reward=None), rewards)
    stats = mc_values(returns)
    np.testing.assert_allclose(stats.mean, [0.75, 0.125])
    np.testing.assert_allclose(stats.var, [0.25, (0.015625 * 2 + 0.390625 + 0.765625) / 3])
    np.testing.assert_allclose(stats.stderr, np.sqrt(stats.var / 4))
    np.testing.assert_array_equal(stats.count, [4, 4])
    one = mc_values(np.array([[2.0]]))
    assert (one.mean[0], one.var[0], one.stderr[0]) == (2.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="returns must be"):
        mc_values(np.zeros(3))
    with pytest.raises(ValueError, match="differ in shape"):
        branch_returns(np.zeros((2, 2)), np.ones((2, 3), bool))


def test_score_dedupes_and_passes_fields():
    calls = []

    def exact(prompts, completions, answer, **kwargs):
        calls.append(len(completions))
        return [float(c.strip().endswith(a)) for c, a in zip(completions, answer, strict=True)]

    def brevity(prompts, completions, **kwargs):
        return [-0.01 * len(c) for c in completions]

    prompts = ["q"] * 4
    completions = ["x 4", "x 4", "x 5", "x 4"]
    fields = [{"answer": "4"}, {"answer": "4"}, {"answer": "4"}, {"answer": "5"}]
    got = score([exact, brevity], prompts, completions, fields, weights=[1.0, 2.0])
    np.testing.assert_allclose(got, [0.94, 0.94, -0.06, -0.06])
    assert calls == [3]  # the two identical items were scored once
    with pytest.raises(ValueError, match="returned 1 values for 3 completions"):
        score(lambda prompts, completions, **kw: [1.0], prompts, completions, fields)


def test_ragged_mc_values_and_adaptive_rounds():
    returns = ragged([[1.0, 0.0, 1.0, 1.0], [], [0.5], [1.0, 1.0]])
    stats = mc_values(returns)
    np.testing.assert_array_equal(stats.count, [4, 0, 1, 2])
    np.testing.assert_allclose(stats.mean[[0, 2, 3]], [0.75, 0.5, 1.0])
    assert np.isnan(stats.mean[1]) and np.isnan(stats.var[1])
    np.testing.assert_allclose(stats.var[[0, 2, 3]], [0.25, 0.0, 0.0])
    # fixed K: everyone to the cap; adaptive (target 0.3): state 0's half-width 1.96 * 0.25 = 0.49
    # gets 4 more (capped at 6), the empty state its first round, settled states keep theirs
    np.testing.assert_array_equal(branches_wanted(stats, 4, 4, None), [4, 4, 4, 4])
    np.testing.assert_array_equal(branches_wanted(stats, 4, 6, 0.3), [6, 4, 1, 2])
    np.testing.assert_array_equal(branches_wanted(stats, 4, 16, 0.5), [4, 4, 1, 2])  # 0.49 <= 0.5


def test_mc_record_round_trip():
    record = MCRecord("abc", "full", 7, [0, 3, 5], [[1.0, 0.0], [], [1.0, 1.0, 1.0]], branch_tokens=12)
    fields = record.to_fields()
    assert fields["positions"] == [7, 10, 12] and fields["mean"] == [0.5, None, 1.0] and fields["count"] == [2, 0, 3]
    again = MCRecord.from_fields(fields)
    assert again.returns == record.returns and again.branch_tokens == 12
    np.testing.assert_array_equal(again.response_positions, [0, 3, 5])
    with pytest.raises(ValueError, match="older vinekv"):
        MCRecord.from_fields({"mean": [0.5]})


def test_reward_functions_get_only_the_arguments_they_declare():
    def plain(prompts, completions):  # no **kwargs: the stored answer field must not be passed
        return [float(len(c)) for c in completions]

    def wants_answer(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    got = score([plain, wants_answer], ["q", "q"], ["4", "12"], [{"answer": "4"}, {"answer": "4"}])
    np.testing.assert_allclose(got, [2.0, 2.0])


def test_a_reward_with_other_argument_names_gets_a_clear_error():
    with pytest.raises(TypeError, match=r"requires \['c', 'p'\].*called by keyword as fn\(prompts="):
        score(lambda p, c, **k: [1.0], ["q"], ["x"], [{}])
    with pytest.raises(TypeError, match=r"requires \['answer'\].*\['completions', 'prompts'\] here"):
        score(lambda prompts, completions, answer: [1.0], ["q"], ["x"], [{}])


def test_replay_batches_respect_the_count_and_the_kv_budget():
    mib = 2**20
    config = ReplayConfig(trajectories_per_call=3, batch_kv_mb=10.0)
    # 1 MiB per token: lengths 4, 4 fit (8 MiB), a third 4 would make 12; then 3 + 3 + 3 by count
    assert replay_batches([4, 4, 4, 3, 3, 3, 1], mib, config) == [[0, 1], [2, 3, 4], [5, 6]]
    # a trajectory over the budget on its own still gets a batch of its own
    assert replay_batches([2, 20, 2], mib, config) == [[0], [1], [2]]
    assert replay_batches([], mib, config) == []
    assert replay_batches([1] * 7, 1, ReplayConfig()) == [list(range(7))]  # defaults: up to 16, 64 MiB
    with pytest.raises(ValueError, match="batch_kv_mb must be > 0"):
        ReplayConfig(batch_kv_mb=0)
