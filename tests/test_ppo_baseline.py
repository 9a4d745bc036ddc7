"""The PPO baseline (`vinekv.trainer.ppo_baseline`) on the tiny model: the settings it maps, updates per
batch, a sampling key per step, task fields for the reward, Monte-Carlo critic targets (lambda = 1) and
`critic_values` against the values the trainer itself computed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from datasets import Dataset
from trainer_kit import COMPLETION_LEN, GROUP, PROMPT_LEN, PROMPTS, even_bytes, fresh_model, left_padded_tokenizer
from trainer_kit import trainer_settings as vineppo_settings

from vinekv.trainer.ppo_baseline import PPOBaselineTrainer, critic_values, ppo_config

ANSWERS = ["19", "12"]  # one per prompt of trainer_kit.PROMPTS
EPOCHS, BATCHES = 2, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trainer after BATCHES batches of EPOCHS updates, each preprocessed batch and every
    reward call (prompts, completions, answers, returned rewards)."""
    tokenizer = left_padded_tokenizer()
    settings = vineppo_settings(
        tmp_path_factory.mktemp("ppo"),
        vineppo_ppo_epochs=EPOCHS,
        vineppo_whiten_advantages=True,
        max_training_steps=EPOCHS * BATCHES,
    )
    calls = []

    def scored(prompts, completions, answer, **kwargs):
        rewards = even_bytes(prompts, completions)
        calls.append((list(prompts), list(completions), list(answer), rewards))
        return rewards

    trainer = PPOBaselineTrainer(
        arguments=ppo_config(settings),
        model=fresh_model(),
        reward_funcs=scored,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS}),
        processing_class=tokenizer,
    )
    batches, preprocess = [], trainer._preprocess_batch_input

    def preprocess_and_keep(state, batch, is_train):
        out, metrics = preprocess(state, batch, is_train)
        batches.append({k: np.asarray(jax.device_get(v)) for k, v in out.items()})
        return out, metrics

    trainer._preprocess_batch_input = preprocess_and_keep
    state = trainer.train().state
    return trainer, state, batches, calls


def test_settings_map_like_the_other_methods(tmp_path):
    config = ppo_config(
        vineppo_settings(tmp_path, vineppo_ppo_epochs=3, epsilon=0.1, beta=0.01, vineppo_whiten_advantages=True)
    )
    assert (config.num_ppo_epochs, config.cliprange, config.kl_coef, config.whiten_advantages) == (3, 0.1, 0.01, True)
    assert (config.gamma, config.lam, config.cliprange_value) == (1.0, 1.0, 0.2)
    assert (config.total_batch_size, config.num_return_sequences) == (len(PROMPTS), GROUP)
    assert (config.max_prompt_length, config.max_completion_length, config.learning_rate) == (
        PROMPT_LEN,
        COMPLETION_LEN,
        1e-3,
    )
    # sampling as VinePPOConfig pins it for the compiled generate, unless given
    assert (config.generation_temperature, config.generation_top_p, config.generation_top_k) == (1.0, 1.0, 0)
    given = ppo_config(vineppo_settings(tmp_path, temperature=0.6, top_p=0.9))
    assert (given.generation_temperature, given.generation_top_p, given.generation_top_k) == (0.6, 0.9, 0)
    assert ppo_config(vineppo_settings(tmp_path, lam=0.95)).lam == 0.95  # PPOConfig's own fields pass
    with pytest.raises(ValueError, match=r"\['vineppo_mod'\] are neither"):
        ppo_config(vineppo_settings(tmp_path, vineppo_mod="full"))
    with pytest.raises(ValueError, match="use_esurge_generation must be False"):
        ppo_config(vineppo_settings(tmp_path, use_esurge_generation=True))


def test_each_batch_makes_epochs_updates(run):
    trainer, state, batches, _ = run
    assert int(jax.device_get(state.step)) == EPOCHS * BATCHES and len(batches) == BATCHES
    assert [h["step"] for h in trainer.history] == [EPOCHS * (i + 1) for i in range(BATCHES)]
    # the last update of a batch ran on a moved policy against the rollout's log-probs
    assert all(h["approx_kl"] > 0 and h["ratio_mean"] != 1.0 for h in trainer.history)
    for name in ("policy_loss", "value_loss", "pg_clipfrac", "vf_clipfrac", "mean_entropy", "score_mean"):
        assert all(np.isfinite(h[name]) for h in trainer.history), name


def test_one_policy_samples_afresh_at_each_step(run):
    """EasyDeL's generate samples with PRNGKey(0) on every call; the trainer's folds in the step."""
    trainer, state, batches, _ = run
    prompts = batches[0]["input_ids"][::GROUP, :PROMPT_LEN]
    mask = batches[0]["attention_mask"][::GROUP, :PROMPT_LEN]

    def sample(step: int) -> np.ndarray:
        at = state.replace(step=jnp.asarray(step, dtype=jnp.asarray(state.step).dtype))
        out = trainer.generate_unified(input_ids=prompts, attention_mask=mask, state=at, shard_inputs=False)
        return np.asarray(out.sequences)

    first = sample(0)
    assert first.shape == (len(PROMPTS) * GROUP, PROMPT_LEN + COMPLETION_LEN)
    np.testing.assert_array_equal(sample(0), first)  # reproducible from generation_seed and step
    assert not np.array_equal(sample(EPOCHS), first)


def test_reward_gets_the_answer_of_each_completions_prompt(run):
    _, _, _, calls = run
    assert len(calls) == BATCHES
    by_prompt = dict(zip(PROMPTS, ANSWERS, strict=True))
    for prompts, completions, answers, _ in calls:
        assert len(prompts) == len(completions) == len(answers) == len(PROMPTS) * GROUP
        assert answers == [by_prompt[p] for p in prompts]
        assert sorted(set(answers)) == sorted(ANSWERS)


def test_critic_targets_are_the_monte_carlo_returns(run):
    """gamma = lambda = 1 and no KL: every token's return is its response's score."""
    _, _, batches, calls = run
    for batch, (_, _, _, rewards) in zip(batches, calls, strict=True):
        mask = batch["completion_mask"].astype(bool)
        want = np.broadcast_to(np.asarray(rewards)[:, None], mask.shape)
        np.testing.assert_allclose(batch["returns"][mask], want[mask], atol=1e-5)
        adv = batch["advantages"][mask]  # whitened over the batch's tokens
        assert abs(adv.mean()) < 1e-4 and abs(adv.std() - 1) < 1e-3


def test_critic_values_are_the_values_the_trainer_computes(run):
    trainer, state, batches, _ = run
    batch = batches[-1]
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    _, values = trainer.compute_rollout_logps_values(state.graphstate, state.graphother, ids, mask)
    values = np.asarray(values)
    assert np.abs(values).max() > 1e-3  # the zero-initialised head has been trained
    for row in (0, GROUP):  # a completion of each prompt
        prompt = batch["input_ids"][row, :PROMPT_LEN][batch["attention_mask"][row, :PROMPT_LEN] == 1]
        length = int(batch["completion_mask"][row].sum())
        response = batch["input_ids"][row, PROMPT_LEN : PROMPT_LEN + length]
        got = critic_values(state, prompt, response, np.arange(length + 1))
        assert got.shape == (length + 1,)
        np.testing.assert_allclose(got[:length], values[row, :length], atol=1e-5)
        # positions index prefixes: V(prompt + response[:p]) is V at p of a shorter response
        cut = min(3, length)
        np.testing.assert_allclose(critic_values(state, prompt, response[:cut], [0, cut]), got[[0, cut]], atol=1e-5)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 1\]"):
        critic_values(state, prompt, response[:1], [2])
    with pytest.raises(TypeError, match="has no value_head"):
        critic_values(fresh_model().to_state(), prompt, response, [0])
