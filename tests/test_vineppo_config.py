"""VinePPOConfig: EasyDeL GRPOConfig fields plus validated VinePPO fields."""

from __future__ import annotations

import pytest

from vinekv.trainer.vineppo_config import VinePPOConfig


def test_defaults_and_replay_settings():
    assert VinePPOConfig().vineppo_mode == "full"
    lite = VinePPOConfig(
        vineppo_mode="lite", max_completion_length=64, lite_num_branches=3, lite_branch_max_len=20, lite_anchor_stride=8
    )
    assert lite.num_return_sequences == 4  # GRPO fields still resolve
    replay = lite.replay_config(seed=5)
    assert (replay.mode, replay.branches, replay.max_tokens, replay.lite_anchor_stride, replay.seed) == (
        "lite",
        3,
        20,
        8,
        5,
    )
    full = VinePPOConfig(vineppo_mode="full", max_completion_length=64, vineppo_branches=6, vineppo_max_states=4)
    replay = full.replay_config()
    assert (replay.mode, replay.branches, replay.max_tokens, replay.max_states) == ("full", 6, 64, 4)
    assert VinePPOConfig(vineppo_mode="full", vineppo_max_depth=32).replay_config().max_tokens == 32
    sampled = VinePPOConfig(generation_temperature=0.7, generation_top_p=0.9, generation_top_k=20).replay_config()
    assert (sampled.temperature, sampled.top_p, sampled.top_k) == (0.7, 0.9, 20)  # branches sample like rollouts
    # unset, the settings each generation path would use are pinned for rollouts and branches alike
    compiled = VinePPOConfig(use_esurge_generation=False)
    assert (compiled.generation_temperature, compiled.generation_top_p, compiled.generation_top_k) == (1.0, 1.0, 0)
    assert (compiled.replay_config().top_k, compiled.replay_config().top_p) == (0, 1.0)
    esurge = VinePPOConfig(use_esurge_generation=True).replay_config()
    assert (esurge.temperature, esurge.top_p, esurge.top_k) == (1.0, 1.0, 64)  # GRPOConfig sets t and p itself
    assert VinePPOConfig(vineppo_mode="off").generation_top_k is None  # plain GRPO: untouched
    with pytest.raises(ValueError, match="runs no branch replay"):
        VinePPOConfig(vineppo_mode="off").replay_config()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vineppo_mode": "half"}, "vineppo_mode must be one of"),
        ({"vineppo_branches": 0}, "vineppo_branches must be >= 1, got 0"),
        ({"vineppo_cache_strategy": "disk"}, "needs vineppo_store"),
        ({"vineppo_cache_strategy": "ssd"}, "vineppo_cache_strategy must be one of"),
        ({"vineppo_engine": "vllm"}, "vineppo_engine must be one of"),
        ({"vineppo_codec": "fp4"}, "vineppo_codec must be one of"),
        ({"vineppo_gamma": 1.5}, r"vineppo_gamma must be in \[0, 1\]"),
        ({"vineppo_lambda": -0.1}, r"vineppo_lambda must be in \[0, 1\]"),
        ({"lite_anchor_stride": 0}, "lite_anchor_stride must be >= 1 or None"),
        ({"lite_num_branches": 0}, "lite_num_branches must be >= 1"),
        ({"vineppo_ppo_epochs": 0}, "vineppo_ppo_epochs must be >= 1"),
        ({"vineppo_step_delimiter": ""}, "vineppo_step_delimiter must be a non-empty string"),
        ({"vineppo_offline_run": "r1"}, "vineppo_offline_run needs vineppo_store"),
        ({"vineppo_offline_run": "r1", "vineppo_store": "kv", "vineppo_mode": "off"}, "must be 'lite' or 'full'"),
        ({"vineppo_baseline": "learned"}, "vineppo_baseline must be one of"),
        ({"vineppo_capture_rows": 0}, "vineppo_capture_rows must be >= 1"),
        ({"vineppo_spill_buffer_mb": 0}, "vineppo_spill_buffer_mb must be >= 1"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VinePPOConfig(**kwargs)


def test_disk_strategy_with_a_store_is_valid(tmp_path):
    config = VinePPOConfig(vineppo_cache_strategy="disk", vineppo_store=str(tmp_path / "kv"), vineppo_codec="lossless")
    assert config.vineppo_store.endswith("kv")


def test_every_problem_is_listed_at_once():
    with pytest.raises(ValueError) as err:
        VinePPOConfig(vineppo_mode="half", vineppo_branches=0, vineppo_cache_strategy="disk")
    assert all(part in str(err.value) for part in ("vineppo_mode", "vineppo_branches", "vineppo_store"))


def test_tempered_sampling_warns_that_the_update_is_off_policy(caplog):
    with caplog.at_level("WARNING", logger="vinekv.trainer.vineppo_config"):
        VinePPOConfig(save_directory="unused", use_esurge_generation=False)
    assert not caplog.records  # pinned T 1: the ratio's log-probs are the sampler's
    with caplog.at_level("WARNING", logger="vinekv.trainer.vineppo_config"):
        VinePPOConfig.paper_preset(save_directory="unused")
    assert "temperature 0.6," in caplog.text and "off-policy" in caplog.text
