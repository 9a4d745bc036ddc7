"""The PPO loss that replaces EasyDeL 0.3.0's GRPO clipping: `ppo_token_loss` by hand (values and
gradients, both signs of A), how EasyDeL's installed formula differs, and `ppo_step` on the tiny
model: with EasyDeL's formula plugged in it reproduces ``grpo_step``; VinePPOTrainer compiles it
with `ppo_token_loss`."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from datasets import Dataset
from easydel.trainers.group_relative_policy_optimization._fn import grpo_step
from easydel.trainers.training_utils import normalize_generation_model_kwargs
from transformers import GenerationConfig

from vinekv.models import BYTE_VOCAB, build_model, build_tokenizer
from vinekv.trainer.losses import ppo_token_loss
from vinekv.trainer.ppo_step import STATIC_ARGNUMS, ppo_step
from vinekv.trainer.vineppo_config import VinePPOConfig
from vinekv.trainer.vineppo_trainer import VinePPOTrainer

GRPO_STATICS = tuple(range(2, 19))


def easydel_token_loss(logps, old_logps, advantages, clip_low, clip_high):
    """EasyDeL 0.3.0's per-token loss, as written in grpo_step (_fn.py 705-718, ``delta=None``)."""
    coef_1 = jnp.exp(logps - old_logps)
    coef_2 = jnp.clip(coef_1, 1 - clip_low, 1 + clip_high)
    per_token_loss1, per_token_loss2 = coef_1 * advantages, coef_2 * advantages
    return -jnp.where(
        advantages >= 0,
        jnp.minimum(per_token_loss1, per_token_loss2),
        jnp.maximum(per_token_loss1, per_token_loss2),
    )


def loss_and_grad(fn, ratio: float, advantage: float, clip_low=0.2, clip_high=0.2) -> tuple[float, float]:
    """Loss and d loss / d logp of one token with ratio ``ratio`` (old log-prob 0)."""
    value, grad = jax.value_and_grad(lambda lp: fn(lp, jnp.float32(0.0), jnp.float32(advantage), clip_low, clip_high))(
        jnp.log(jnp.float32(ratio))
    )
    return float(value), float(grad)


# -- ppo_token_loss by hand ------------------------------------------------------------------------

# (A, r) -> (loss, dloss/dlogp), clip 0.2 / 0.2; outside the clip region the gradient is 0 only on
# the side where moving further would improve the objective.
HAND_TABLE = [
    (+1.0, 0.5, -0.5, -0.5),  # below 1-eps, A > 0: unclipped, push up
    (+1.0, 1.0, -1.0, -1.0),  # r = 1: -A, gradient -A
    (+1.0, 1.5, -1.2, 0.0),  # above 1+eps, A > 0: clipped
    (-1.0, 0.5, 0.8, 0.0),  # below 1-eps, A < 0: clipped
    (-1.0, 1.0, 1.0, 1.0),
    (-1.0, 1.5, 1.5, 1.5),  # above 1+eps, A < 0: unclipped, pull back down
]


@pytest.mark.parametrize(("advantage", "ratio", "loss", "grad"), HAND_TABLE)
def test_ppo_token_loss_by_hand(advantage, ratio, loss, grad):
    got_loss, got_grad = loss_and_grad(ppo_token_loss, ratio, advantage)
    assert got_loss == pytest.approx(loss, abs=1e-6)
    assert got_grad == pytest.approx(grad, abs=1e-6)


@pytest.mark.parametrize(
    ("advantage", "ratio", "loss", "grad"),
    [
        (+1.0, 1.25, -1.25, -1.25),  # inside 1 + 0.28
        (+1.0, 1.5, -1.28, 0.0),  # clipped at 1 + 0.28
        (-1.0, 1.25, 1.25, 1.25),
        (-1.0, 0.85, 0.85, 0.85),  # inside 1 - 0.2
        (-1.0, 0.75, 0.8, 0.0),  # clipped at 1 - 0.2
        (+2.0, 0.5, -1.0, -1.0),  # scales with |A|
    ],
)
def test_ppo_token_loss_asymmetric_clip(advantage, ratio, loss, grad):
    got_loss, got_grad = loss_and_grad(ppo_token_loss, ratio, advantage, clip_low=0.2, clip_high=0.28)
    assert got_loss == pytest.approx(loss, abs=1e-6)
    assert got_grad == pytest.approx(grad, abs=1e-6)


def test_ppo_token_loss_shapes():
    rng = np.random.default_rng(0)
    logps = jnp.asarray(rng.normal(-2.0, 0.5, (3, 5)), jnp.float32)
    old = logps + jnp.asarray(rng.normal(0.0, 0.4, (3, 5)), jnp.float32)
    ratio = np.exp(np.asarray(logps - old, np.float64))

    def expected(adv):
        return -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.28) * adv)

    per_token = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    per_sequence = jnp.asarray([[1.0], [-1.0], [0.5]], jnp.float32)
    for adv in (per_token, per_sequence):
        out = ppo_token_loss(logps, old, adv, 0.2, 0.28)
        assert out.shape == (3, 5)
        np.testing.assert_allclose(np.asarray(out), expected(np.asarray(adv, np.float64)), rtol=1e-5, atol=1e-6)


# -- EasyDeL's installed formula -------------------------------------------------------------------


def test_easydel_formula_is_the_installed_one_and_differs_for_negative_advantages():
    source = inspect.getsource(grpo_step)
    assert "jnp.maximum(per_token_loss1, per_token_loss2)" in source  # the A < 0 branch inlined above
    # A >= 0: identical
    for ratio in (0.5, 1.0, 1.5):
        assert loss_and_grad(easydel_token_loss, ratio, 1.0) == pytest.approx(loss_and_grad(ppo_token_loss, ratio, 1.0))
    # A < 0, r < 1 - eps: EasyDeL keeps pushing r down (nonzero gradient), PPO has clipped
    assert loss_and_grad(easydel_token_loss, 0.5, -1.0) == pytest.approx((0.5, 0.5))
    assert loss_and_grad(ppo_token_loss, 0.5, -1.0) == pytest.approx((0.8, 0.0))
    # A < 0, r > 1 + eps: EasyDeL gives no gradient, PPO pulls r back down
    assert loss_and_grad(easydel_token_loss, 1.5, -1.0) == pytest.approx((1.2, 0.0))
    assert loss_and_grad(ppo_token_loss, 1.5, -1.0) == pytest.approx((1.5, 1.5))


# -- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [({"loss_type": "cispo"}, "cispo"), ({"delta": 2.0}, "delta")])
def test_unsupported_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ppo_step(None, {}, 4, 0.0, **kwargs)  # refused before the batch is looked at
    with pytest.raises(ValueError, match=match):
        VinePPOConfig(vineppo_mode="off", **kwargs)


# -- the step on the tiny model --------------------------------------------------------------------

PROMPTS = ["Q: 12+7?\n", "Q: 3*4?\n"]
PROMPT_LEN, COMPLETION_LEN, GROUP, BETA = 16, 8, 4, 0.04


@pytest.fixture(scope="module")
def trainer(tmp_path_factory) -> VinePPOTrainer:
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    model = build_model("llama", seed=0)
    model.generation_config = GenerationConfig(eos_token_id=BYTE_VOCAB, pad_token_id=BYTE_VOCAB + 1, do_sample=True)
    config = VinePPOConfig(
        save_directory=str(tmp_path_factory.mktemp("ckpt")),
        do_last_save=False,
        max_prompt_length=PROMPT_LEN,
        max_completion_length=COMPLETION_LEN,
        total_batch_size=len(PROMPTS),
        num_return_sequences=GROUP,
        use_esurge_generation=False,
        max_training_steps=1,
        learning_rate=1e-3,
        beta=BETA,
        loss_type="dapo",
        do_eval=False,
        use_wandb=False,
        progress_bar_type="json",
        track_memory=False,
        vineppo_mode="off",
    )
    return VinePPOTrainer(
        arguments=config,
        model=model,
        reward_funcs=lambda prompts, completions, **kwargs: [0.0] * len(completions),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )


@pytest.fixture(scope="module")
def data(trainer) -> tuple[dict[str, jax.Array], jax.Array]:
    """A step batch and the current policy's log-probs ``[N, Lc]`` of its completions.

    One prompt row per prompt, GROUP random completions each (two with padding), per-token
    advantages of both signs, old and reference log-probs around the current ones."""
    rng = np.random.default_rng(0)
    rows = len(PROMPTS) * GROUP
    enc = trainer.processing_class(PROMPTS, padding="max_length", max_length=PROMPT_LEN, return_tensors="np")
    prompt_ids, prompt_mask = jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(enc["attention_mask"], jnp.int32)
    completion_ids = jnp.asarray(rng.integers(0, 256, (rows, COMPLETION_LEN)), jnp.int32)
    mask = np.ones((rows, COMPLETION_LEN), np.int32)
    mask[0, 5:] = 0
    mask[5, 2:] = 0
    completion_mask = jnp.asarray(mask)
    state = trainer.model_state
    current = trainer.compute_refmodel_logps(
        state.graphstate,
        state.graphother,
        jnp.concatenate([prompt_ids.repeat(GROUP, 0), completion_ids], axis=1),
        jnp.concatenate([prompt_mask.repeat(GROUP, 0), completion_mask], axis=1),
        normalize_generation_model_kwargs(None, model_callable=state.model.__call__),
    )
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": jnp.asarray(rng.normal(size=(rows, COMPLETION_LEN)) * mask, jnp.float32),
        "old_per_token_logps": current + jnp.asarray(rng.normal(scale=0.4, size=(rows, COMPLETION_LEN)), jnp.float32),
        "ref_per_token_logps": current + jnp.asarray(rng.normal(scale=0.2, size=(rows, COMPLETION_LEN)), jnp.float32),
        "num_items_in_batch": jnp.sum(completion_mask),
    }
    return batch, current


def test_step_reproduces_grpo_step_with_easydel_formula_and_uses_ppo_loss(trainer, data):
    batch, current = data
    statics = trainer._eval_shared_fn_static_args
    assert statics[-1] is ppo_token_loss and trainer._train_shared_fn_static_args[-1] is ppo_token_loss
    assert len(statics) == len(STATIC_ARGNUMS) == len(GRPO_STATICS) + 1
    assert trainer.sharded_training_step_function.static_argnums_ == STATIC_ARGNUMS

    mask = np.asarray(batch["completion_mask"], bool)
    adv = np.asarray(batch["advantages"])
    current, old, ref = (
        np.asarray(a, np.float64) for a in (current, batch["old_per_token_logps"], batch["ref_per_token_logps"])
    )
    ratio = np.exp(current - old)
    outside = (ratio < 0.8) | (ratio > 1.2)
    assert np.any(mask & (adv < 0) & outside) and np.any(mask & (adv > 0) & outside)

    state = trainer.model_state
    with trainer.model.mesh:
        grpo = jax.jit(grpo_step, static_argnums=GRPO_STATICS)(state, batch, *statics[:-1])
        hooked = jax.jit(ppo_step, static_argnums=STATIC_ARGNUMS)(state, batch, *statics[:-1], easydel_token_loss)
        ppo = trainer.sharded_evaluation_step_function(state, batch, *statics)

    # EasyDeL's formula through ppo_step: grpo_step's loss and metrics exactly
    assert float(hooked.loss) == pytest.approx(float(grpo.loss), rel=1e-6, abs=1e-7)
    added = {"policy_kl", "ratio/mean", "ratio/max", "ratio/min"}
    assert sorted(set(hooked.other_metrics) - added) == sorted(grpo.other_metrics)
    for name, value in grpo.other_metrics.items():
        if name != "mean_entropy":  # grpo_step computes entropies only for top_entropy_quantile < 1
            np.testing.assert_allclose(float(hooked.other_metrics[name]), float(value), rtol=1e-6, equal_nan=True)

    # the update-size metrics against the ratio computed here, over the real tokens
    log_ratio = current - old
    assert float(hooked.other_metrics["policy_kl"]) == pytest.approx(
        (np.expm1(log_ratio) - log_ratio)[mask].mean(), 1e-4
    )
    assert float(hooked.other_metrics["ratio/mean"]) == pytest.approx(ratio[mask].mean(), rel=1e-4)
    assert float(hooked.other_metrics["ratio/max"]) == pytest.approx(ratio[mask].max(), rel=1e-4)
    assert float(hooked.other_metrics["ratio/min"]) == pytest.approx(ratio[mask].min(), rel=1e-4)
    assert float(hooked.other_metrics["mean_entropy"]) > 0  # a random 256-token policy is far from certain

    # the trainer's step: PPO's loss (dapo: sum over real tokens / num_items_in_batch, + beta * k3 KL)
    clipped = np.clip(ratio, 0.8, 1.2)
    kl = np.exp(ref - current) - (ref - current) - 1
    per_token = -np.minimum(ratio * adv, clipped * adv) + BETA * kl
    expected = (per_token * mask).sum() / mask.sum()
    assert float(ppo.loss) == pytest.approx(expected, rel=1e-4)
    assert abs(float(ppo.loss) - float(grpo.loss)) > 1e-3

    # the compiled training step runs it too (on a copy: it donates the state)
    with trainer.model.mesh:
        new_state, metrics = trainer.sharded_training_step_function(
            jax.tree_util.tree_map(jnp.copy, state),
            batch,
            *trainer._train_shared_fn_extra_args,
            *trainer._train_shared_fn_static_args,
        )
    assert float(metrics.loss) == pytest.approx(float(ppo.loss), rel=1e-5)
    assert int(jax.device_get(new_state.step)) == 1 and float(metrics.max_grad_norm) > 0


def test_step_cuts_per_token_arrays_to_max_loss_completion_tokens(trainer, data):
    """Per-token advantages and old log-probs are cut with the completions (grpo_step would fail
    on the shapes), here together with row-chunked log-probs; dapo then normalises by the cut
    token count."""
    batch, current = data
    width, statics = 5, list(trainer._eval_shared_fn_static_args)
    statics[STATIC_ARGNUMS.index(15)] = 3  # completion_chunk_size: rows in chunks of 3
    statics[STATIC_ARGNUMS.index(16)] = width  # max_loss_completion_tokens
    with trainer.model.mesh:
        got = jax.jit(ppo_step, static_argnums=STATIC_ARGNUMS)(trainer.model_state, batch, *statics)

    cut = {
        k: np.asarray(v, np.float64)[:, :width] for k, v in batch.items() if k.endswith("logps") or k == "advantages"
    }
    mask = np.asarray(batch["completion_mask"], bool)[:, :width]
    logps, adv = np.asarray(current, np.float64)[:, :width], cut["advantages"]
    ratio, ref = np.exp(logps - cut["old_per_token_logps"]), cut["ref_per_token_logps"]
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv) + BETA * (
        np.exp(ref - logps) - (ref - logps) - 1
    )
    assert float(got.loss) == pytest.approx((per_token * mask).sum() / mask.sum(), rel=1e-4)
