"""VinePPOTrainer on the tiny model: real GRPO steps in every mode and cache strategy, identical
advantages across strategies, the update's direction, offline training and stale refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from datasets import Dataset
from trainer_kit import (
    COMPLETION_LEN,
    GROUP,
    PROMPTS,
    even_bytes,
    fresh_model,
    left_padded_tokenizer,
    make_trainer,
    prompt_batch,
    trainer_settings,
)

from vinekv.kvstore.capture import StalePolicyError
from vinekv.kvstore.store import SnapshotStore
from vinekv.trainer.rollouts import Rollout
from vinekv.trainer.vineppo_config import VinePPOConfig
from vinekv.trainer.vineppo_trainer import VinePPOTrainer, rollout_stop_ids


@pytest.fixture(scope="module")
def tokenizer():
    return left_padded_tokenizer()


def record_batches(trainer: VinePPOTrainer) -> list[tuple[dict, dict]]:
    """Keeps every preprocessed batch the trainer produces, with the metrics its step logs."""
    seen, preprocess, execute = [], trainer._preprocess_batch_input, trainer._execute_train_step

    def preprocess_and_keep(state, batch, is_train):
        out, metrics = preprocess(state, batch, is_train)
        seen.append(({k: np.asarray(jax.device_get(v)) for k, v in out.items()}, {}))
        return out, metrics

    def execute_and_keep(state, batch):
        state, metrics, error = execute(state, batch)
        seen[-1][1].update(metrics.other_metrics or {})
        return state, metrics, error

    trainer._preprocess_batch_input = preprocess_and_keep
    trainer._execute_train_step = execute_and_keep
    return seen


@pytest.mark.parametrize("strategy", ["memory", "disk", "recompute"])
@pytest.mark.parametrize("mode", ["off", "lite", "full"])
def test_one_training_step(tmp_path, tokenizer, mode, strategy):
    epochs = 2
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        vineppo_mode=mode,
        vineppo_cache_strategy=strategy,
        vineppo_ppo_epochs=epochs,
        max_training_steps=2 * epochs,
    )
    before = jax.device_get(trainer.model_state.graphstate)
    batches = record_batches(trainer)
    state = trainer.train().state
    assert int(jax.device_get(state.step)) == 2 * epochs and len(batches) == 2  # two batches, epochs updates each
    assert trainer._batch_bar.n == 2 * epochs  # vinekv's bar moved per batch (EasyDeL's waits for log_steps)
    changed = jax.tree_util.tree_map(
        lambda a, b: bool(np.any(np.asarray(a) != b)), jax.device_get(state.graphstate), before
    )
    assert any(jax.tree_util.tree_leaves(changed))
    # a fresh sampling key every step: the same prompts get other completions
    assert not np.array_equal(batches[0][0]["completion_ids"], batches[1][0]["completion_ids"])
    out, metrics = batches[0]
    adv, mask = out["advantages"], out["completion_mask"].astype(bool)
    assert adv.shape == (len(PROMPTS) * GROUP, COMPLETION_LEN) and np.all(np.isfinite(adv))
    assert np.all(adv[~mask] == 0) and np.any(adv[mask] != 0)
    assert out["old_per_token_logps"].shape == adv.shape and np.all(out["old_per_token_logps"][mask] < 0)
    if mode == "off":
        # GRPO's sequence advantage, the same on every token of a completion
        rows = [np.unique(adv[i][mask[i]]) for i in range(adv.shape[0])]
        assert all(len(r) == 1 for r in rows)
        return
    assert metrics["vineppo/states"] > len(PROMPTS) * GROUP  # several states per response
    # equal states (a group's prompt state at least) sampled once: fewer branches than states x K
    assert metrics["vineppo/sampled_states"] <= metrics["vineppo/states"] - len(PROMPTS) * (GROUP - 1)
    assert metrics["vineppo/branches"] == metrics["vineppo/sampled_states"] * 2
    saved = 1 - metrics["vineppo/sampled_states"] / metrics["vineppo/states"]
    assert metrics["vineppo/branches_saved"] == pytest.approx(saved)
    assert metrics["vineppo/mc_value_var"] > 0 and 0 < metrics["vineppo/replay_time_share"] < 1
    assert (metrics["vineppo/store_bytes"] > 0) == (strategy == "disk")
    if strategy == "disk":  # the step's run was read back and deleted (vineppo_keep_snapshots=False)
        assert SnapshotStore.open(str(tmp_path / "kv"), mode="r").runs() == []


@pytest.mark.parametrize("mode", ["lite", "full"])
def test_cache_strategies_give_identical_advantages(tmp_path, tokenizer, mode):
    model = fresh_model()
    batch = prompt_batch(tokenizer)
    results = {}
    for strategy in ("memory", "disk", "recompute"):
        trainer = make_trainer(
            tmp_path / strategy, tokenizer, model=model, vineppo_mode=mode, vineppo_cache_strategy=strategy
        )
        out, metrics = trainer._preprocess_batch_input(trainer.model_state, batch, is_train=True)
        results[strategy] = (np.asarray(out["advantages"]), np.asarray(out["completion_ids"]), metrics)
    adv, ids, metrics = results["memory"]
    assert metrics["vineppo/mc_value_var"] > 0 and np.abs(adv).max() > 0
    for strategy in ("disk", "recompute"):
        np.testing.assert_array_equal(results[strategy][1], ids)
        np.testing.assert_array_equal(results[strategy][0], adv, err_msg=strategy)
        assert results[strategy][2]["vineppo/mc_value_mean"] == metrics["vineppo/mc_value_mean"]


def test_update_raises_logprobs_of_positive_advantage_tokens(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, vineppo_mode="full", learning_rate=3e-4)
    batches = record_batches(trainer)
    state = trainer.train().state
    out = {k: jnp.asarray(v) for k, v in batches[0][0].items()}
    new = np.asarray(trainer._completion_logps(state, out))
    old, adv = batches[0][0]["old_per_token_logps"], batches[0][0]["advantages"]
    mask = batches[0][0]["completion_mask"].astype(bool)
    delta = new - old
    up, down = delta[mask & (adv > 0)], delta[mask & (adv < 0)]
    assert up.size and down.size
    assert up.mean() > 0 > down.mean(), (up.mean(), down.mean())


def test_offline_training_from_a_replayed_store(tmp_path, tokenizer):
    store_path = tmp_path / "kv"
    online = make_trainer(
        tmp_path / "online",
        tokenizer,
        vineppo_mode="full",
        vineppo_cache_strategy="disk",
        vineppo_store=str(store_path),
        vineppo_keep_snapshots=True,
    )
    online_batches = record_batches(online)
    online.train()
    with SnapshotStore.open(str(store_path), mode="r") as store:
        (run,) = store.runs()
        prompts = {store.trajectory_info(run, tid)["prompt"] for tid in store.trajectories(run)}
        assert len(prompts) == len(PROMPTS)  # a group's rows captured in one batch share one prompt node
    offline = make_trainer(
        tmp_path / "offline", tokenizer, vineppo_mode="full", vineppo_store=str(store_path), vineppo_offline_run=run
    )
    offline_batches = record_batches(offline)
    state = offline.train().state
    assert int(jax.device_get(state.step)) == 1
    got, want = offline_batches[0][0], online_batches[0][0]
    for key in ("completion_ids", "completion_mask", "advantages"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert offline_batches[0][1]["vineppo/states"] == online_batches[0][1]["vineppo/states"]

    with pytest.raises(StalePolicyError, match="vineppo_allow_stale"):
        make_trainer(
            tmp_path / "stale",
            tokenizer,
            model=fresh_model(seed=1),
            vineppo_mode="full",
            vineppo_store=str(store_path),
            vineppo_offline_run=run,
        )
    stale_ok = make_trainer(
        tmp_path / "stale_ok",
        tokenizer,
        model=fresh_model(seed=1),
        vineppo_mode="full",
        vineppo_store=str(store_path),
        vineppo_offline_run=run,
        vineppo_allow_stale=True,
    )
    out, _ = stale_ok._preprocess_batch_input(stale_ok.model_state, prompt_batch(tokenizer), is_train=True)
    np.testing.assert_array_equal(np.asarray(out["advantages"]), want["advantages"])
    with pytest.raises(ValueError, match="has 'full' MC values"):
        make_trainer(
            tmp_path / "lite", tokenizer, vineppo_mode="lite", vineppo_store=str(store_path), vineppo_offline_run=run
        )
    with SnapshotStore.open(str(store_path), mode="r+") as store:  # values sampled by another policy
        tid = store.trajectories(run)[0]
        store.annotate(run, tid, mc={**store.trajectory_info(run, tid)["fields"]["mc"], "policy": "f" * 32})
    with pytest.raises(StalePolicyError, match=f"the MC values of trajectory '{tid}'.*policy f{{32}}"):
        make_trainer(
            tmp_path / "other", tokenizer, vineppo_mode="full", vineppo_store=str(store_path), vineppo_offline_run=run
        )


def test_trainer_input_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="Python reward functions"):
        VinePPOTrainer(
            arguments=VinePPOConfig(save_directory=str(tmp_path), vineppo_mode="lite"),
            model=fresh_model(),
            reward_funcs=[even_bytes, object()],
            processing_class=tokenizer,
        )
    from easydel.trainers import GRPOConfig

    with pytest.raises(TypeError, match="must be a VinePPOConfig"):
        VinePPOTrainer(arguments=GRPOConfig(save_directory=str(tmp_path)), model=fresh_model(), reward_funcs=even_bytes)


def constant_half(prompts, completions, **kwargs):
    return [0.5] * len(completions)


def test_grpo_options_reward_weights_accumulation_and_loss_cut(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        vineppo_mode="lite",
        gradient_accumulation_steps=2,
        total_batch_size=1,
        max_loss_completion_tokens=8,
        reward_funcs=[even_bytes, constant_half],
        reward_weights=[2.0, 1.0],
    )
    batches = record_batches(trainer)
    state = trainer.train().state
    out, metrics = batches[0]
    assert int(jax.device_get(state.step)) == 1
    # one prompt row per completion row, so gradient accumulation slices consistent minibatches
    rows = out["completion_ids"].shape[0]
    assert rows % GROUP == 0 and out["prompt_ids"].shape[0] == rows
    np.testing.assert_array_equal(out["prompt_ids"][:GROUP], np.repeat(out["prompt_ids"][:1], GROUP, 0))
    assert out["advantages"].shape == (rows, 8)  # cut like GRPO cuts the completions
    assert metrics["vineppo/trajectory_reward_mean"] == pytest.approx(2 * metrics["even_bytes"] + 0.5, abs=1e-5)


# -- fidelity: task fields, truncation rule, adaptive K, the paper's preset ---------------------

ANSWERS = ["19", "12"]


def answer_in_completion(prompts, completions, answer, **kwargs):
    """A task reward that needs the dataset's ``answer`` column (as GSM8K-style rewards do)."""
    answer_in_completion.seen.append(list(answer))
    return [float(a in c) + 0.1 * (len(c) % 3) for c, a in zip(completions, answer, strict=True)]


answer_in_completion.seen = []


@pytest.mark.parametrize("strategy", ["memory", "disk"])
def test_every_rollout_and_branch_is_scored_with_its_dataset_row(tmp_path, tokenizer, strategy):
    answer_in_completion.seen.clear()
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        reward_funcs=answer_in_completion,
        vineppo_mode="full",
        vineppo_cache_strategy=strategy,
        vineppo_keep_snapshots=True,
    )
    trainer._dataset_rows[True] = Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS, "vinekv_row": [0, 1]})
    batch = {**prompt_batch(tokenizer), "vinekv_row": jnp.asarray([1, 0])}  # prompts of rows 1, 0 (swapped)
    batch["input_ids"], batch["attention_mask"] = batch["input_ids"][::-1], batch["attention_mask"][::-1]
    out, metrics = trainer._preprocess_batch_input(trainer.model_state, batch, is_train=True)
    calls = answer_in_completion.seen
    # GRPO's own scoring: one answer per completion, prompt-major
    assert calls[0] == [ANSWERS[1]] * GROUP + [ANSWERS[0]] * GROUP
    # rollouts and branches: each call scores one prompt's items, all with that prompt's answer
    assert len(calls) > 3 and all(len(set(c)) == 1 for c in calls[1:])
    assert {c[0] for c in calls[1:]} == set(ANSWERS)
    if strategy == "disk":  # the fields went into the store with each trajectory (offline replay scores the same)
        store = SnapshotStore.open(str(tmp_path / "kv"), mode="r")
        (run,) = store.runs()
        info = store.trajectory_info(run, "000000")
        assert info["fields"]["answer"] == ANSWERS[1]


def test_training_step_with_a_task_field(tmp_path, tokenizer):
    trainer = VinePPOTrainer(
        arguments=VinePPOConfig(**trainer_settings(tmp_path, vineppo_mode="lite")),
        model=fresh_model(),
        reward_funcs=answer_in_completion,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS, "answer": ANSWERS}),
        processing_class=tokenizer,
    )
    answer_in_completion.seen.clear()
    state = trainer.train().state
    assert int(jax.device_get(state.step)) == 1
    assert answer_in_completion.seen and all(set(c) <= set(ANSWERS) for c in answer_in_completion.seen)
    assert set(answer_in_completion.seen[0]) == set(ANSWERS)  # both prompts' rows reached GRPO's scoring


def test_truncated_rollouts_get_the_unfinished_reward(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, vineppo_mode="full", vineppo_unfinished_reward=-1.0)
    prompt = np.frombuffer(b"Q: 1?\n", np.uint8).astype(np.int32)
    eos = tokenizer.eos_token_id
    rollouts = [
        Rollout(prompt, np.array([50, 51, eos], np.int32), 0, 0),  # finished
        Rollout(prompt, np.arange(60, 60 + COMPLETION_LEN, dtype=np.int32), 0, 1),  # cut off by the budget
    ]
    rewards = trainer._score_rollouts(rollouts, [{}, {}])
    assert rewards[1] == -1.0 and rewards[0] == pytest.approx(even_bytes([""], ["23"])[0])
    trainer.arguments.vineppo_unfinished_reward = None  # scored as they are, like truncated branches
    assert trainer._score_rollouts(rollouts, [{}, {}])[1] == pytest.approx(
        even_bytes([""], [bytes(range(60, 60 + COMPLETION_LEN)).decode()])[0]
    )
    assert trainer.rollout_stop_ids == {eos}
    assert rollout_stop_ids([eos, 65], {"eos_token_id": [7]}) == {eos, 65, 7}
    replay = trainer.arguments.replay_config(stop_token_ids=tuple(trainer.rollout_stop_ids))
    assert replay.horizon == COMPLETION_LEN and replay.stop_token_ids == (eos,) and replay.sampler == "generate"


def test_adaptive_k_in_training_records_k_per_state(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        vineppo_mode="full",
        vineppo_branches=2,
        vineppo_max_branches=6,
        vineppo_adaptive_ci=0.01,
        vineppo_cache_strategy="disk",
        vineppo_keep_snapshots=True,
    )
    out, metrics = trainer._preprocess_batch_input(trainer.model_state, prompt_batch(tokenizer), is_train=True)
    store = SnapshotStore.open(str(tmp_path / "kv"), mode="r")
    (run,) = store.runs()
    counts = np.concatenate(
        [np.asarray(store.trajectory_info(run, t)["fields"]["mc"]["count"]) for t in store.trajectories(run)]
    )
    counts = counts[counts > 0]
    assert set(counts.tolist()) <= {2, 4, 6} and counts.max() == 6  # even-byte rewards disagree: up to the cap
    assert metrics["vineppo/branches_per_state"] == pytest.approx(counts.mean())
    assert metrics["vineppo/branches_per_state_max"] == 6
    # what each state's K adds up to, less the branches of states shared with an earlier rollout
    assert metrics["vineppo/branches"] == pytest.approx(counts.sum() * (1 - metrics["vineppo/branches_saved"]))
    assert metrics["vineppo/branches"] < counts.sum()


def test_paper_preset():
    config = VinePPOConfig.paper_preset(save_directory="/tmp/preset", vineppo_branches=4)
    assert config.vineppo_branches == 4  # overrides win
    assert (config.vineppo_mode, config.vineppo_step_delimiter, config.vineppo_state_selection) == (
        "full",
        "\n",
        "first",
    )
    assert (config.beta, config.epsilon, config.epsilon_high, config.vineppo_ppo_epochs) == (1e-4, 0.2, 0.2, 2)
    assert config.vineppo_whiten_advantages and config.vineppo_unfinished_reward == 0.0
    assert (config.generation_temperature, config.generation_top_p) == (0.6, 0.9)
    assert VinePPOConfig.paper_preset(save_directory="/tmp/preset").vineppo_branches == 9
    plain = VinePPOConfig(save_directory="/tmp/preset")  # GRPO's defaults but the four the comparison chose
    assert (plain.beta, plain.vineppo_branches, plain.vineppo_whiten_advantages) == (0.04, 4, True)
    assert (plain.vineppo_mode, plain.vineppo_ppo_epochs) == ("full", 2)


def test_max_training_steps_counts_updates_the_last_batch_cut_to_fit(tmp_path, tokenizer):
    """``--steps 3`` with 2 PPO epochs per batch: batches of 2 and 1 updates, 3 in all (it made 4)."""
    trainer = make_trainer(tmp_path, tokenizer, vineppo_mode="off", vineppo_ppo_epochs=2, max_training_steps=3)
    state = trainer.train().state
    assert int(jax.device_get(state.step)) == 3 and not trainer.interrupted
    assert [(h["step"], h["vineppo/ppo_epochs"]) for h in trainer.history] == [(2, 2), (3, 1)]
    assert trainer._batch_bar.n == 3 and trainer._batch_bar.desc == "GRPO updates"


def test_an_interrupt_mid_training_is_reported_after_easydel_saves(tmp_path, tokenizer):
    """Ctrl-C during a batch: EasyDeL catches it, saves a checkpoint and returns as if done; the
    trainer says it was interrupted (so `vinekv train` exits 130, resumable from that checkpoint)."""
    from vinekv.train import checkpoint_step, latest_checkpoint

    trainer = make_trainer(
        tmp_path,
        tokenizer,
        vineppo_mode="off",
        max_training_steps=3,
        do_last_save=True,
        save_directory=str(tmp_path / "checkpoints"),
        model_name="policy",
    )
    preprocess, calls = trainer._preprocess_batch_input, []

    def interrupted_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return preprocess(*args, **kwargs)

    trainer._preprocess_batch_input = interrupted_on_the_second_batch
    state = trainer.train().state
    assert trainer.interrupted and int(jax.device_get(state.step)) == 1 and len(trainer.history) == 1
    saved = latest_checkpoint(tmp_path)  # <output>/checkpoints/policy/run-1
    assert saved is not None and checkpoint_step(saved) == 1
