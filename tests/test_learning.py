"""RL improves the policy: on 8 fixed arithmetic problems, repeated, GRPO and full VinePPO lift
the training batches' reward from the warmed-up policy's ~0.4 to >= 0.8 within a bounded number
of updates.

This is the check that would have caught an update that does not learn (a wrong sign, log-probs
of the wrong tokens, a ratio against the wrong policy, masks off by one, a recompiled sampler
drawing the same samples): with the problems fixed, the rollouts' mean reward is the objective
the updates climb. The starting policy is the task's cached warm-up (`warm_up()`, the one
`vinekv train` uses); the 8 problems are those of a seeded pool that it solves 25-62% of the time
at T = 1, so every group has something to learn from.
"""

from __future__ import annotations

import numpy as np
import pytest
from datasets import concatenate_datasets

from vinekv.configs.train import DEFAULT_TRAINER, job_settings
from vinekv.tasks.arithmetic import make_dataset, reward
from vinekv.tasks.warmup import solved, warm_up
from vinekv.trainer.vineppo_config import VinePPOConfig
from vinekv.trainer.vineppo_trainer import VinePPOTrainer

PROBLEMS, SAMPLES = 8, 8
UPDATES = 40  # 20 batches of 8 problems x 4 responses, 2 PPO epochs each


@pytest.fixture(scope="module")
def fixed_problems():
    """8 problems of a seeded pool (2-3 operations) whose solve rate at T = 1 over 8 samples
    lies in [0.25, 0.625]; ``(dataset, their mean solve rate)``."""
    warmed = warm_up(progress=False)
    pool = make_dataset(96, seed=3, steps=(2, 3))
    rates = np.mean([solved(warmed.model, warmed.tokenizer, pool, temperature=1.0, seed=s) for s in range(SAMPLES)], 0)
    picked = np.flatnonzero((rates >= 0.25) & (rates <= 0.625))[:PROBLEMS]
    assert picked.size == PROBLEMS, f"only {picked.size} problems of the pool are partly solved: {rates.round(2)}"
    return pool.select(picked.tolist()), float(rates[picked].mean())


@pytest.mark.parametrize("mode", ["off", "full"])
def test_rl_raises_the_reward_on_fixed_problems(tmp_path, fixed_problems, mode):
    problems, start_rate = fixed_problems
    settings = {
        **job_settings(tmp_path, seed=0),
        **DEFAULT_TRAINER,
        "vineppo_mode": mode,
        "vineppo_cache_strategy": "memory",
        "total_batch_size": PROBLEMS,  # every batch: the same 8 problems
        "max_training_steps": UPDATES,
        "learning_rate": 2e-4,  # the job's 1e-4 needs more updates to get there
        "learning_rate_end": 2e-4,
        "warmup_steps": 4,
    }
    warmed = warm_up(progress=False)
    trainer = VinePPOTrainer(
        arguments=VinePPOConfig(**settings),
        model=warmed.model,
        reward_funcs=reward,
        train_dataset=concatenate_datasets([problems] * (UPDATES // 2)),
        processing_class=warmed.tokenizer,
    )
    try:
        trainer.train()
    finally:
        trainer.close()
    rewards = np.array(
        [h["vineppo/trajectory_reward_mean" if mode == "full" else "reward_mean"] for h in trainer.history]
    )
    assert len(rewards) == UPDATES // 2
    assert 0.25 <= start_rate <= 0.625 and rewards[:2].mean() <= 0.65, rewards  # the policy starts partly right
    assert rewards[-3:].mean() >= 0.8, rewards  # and ends mostly right
    assert all(h["vineppo/advantage_nonzero"] > 0 for h in trainer.history[:2])  # it trained on something


def test_the_jobs_regime_improves_held_out_accuracy(tmp_path):
    """GRPO in `vinekv train`'s regime (`DEFAULT_TRAINER`: 32 problems x 4 responses, AdamW 1e-4
    after a 20-update warm-up) lifts greedy accuracy on 400 held-out problems within 40 updates
    (measured: 0.43 -> 0.53). Batches of 8 x 4 at the same learning rate did not move it in 300."""
    from vinekv.train import paired_gain

    warmed = warm_up(progress=False)
    held_out = make_dataset(400, seed=12345)
    before = solved(warmed.model, warmed.tokenizer, held_out)
    settings = {
        **job_settings(tmp_path, seed=0),
        **DEFAULT_TRAINER,
        "vineppo_mode": "off",
        "vineppo_cache_strategy": "memory",
        "max_training_steps": 40,
    }
    trainer = VinePPOTrainer(
        arguments=VinePPOConfig(**settings),
        model=warmed.model,
        reward_funcs=reward,
        train_dataset=make_dataset(2000, seed=1),
        processing_class=warmed.tokenizer,
    )
    try:
        state = trainer.train().state
    finally:
        trainer.close()
    gain, stderr = paired_gain(before, solved(state.model, warmed.tokenizer, held_out))
    assert gain >= 0.05 and gain > 2 * stderr, (gain, stderr)
