"""PPO with a value network, the VinePPO paper's main baseline, on EasyDeL 0.3.0's `PPOTrainer`.

`ppo_config` turns the settings the other `vinekv compare` methods train with (`VinePPOConfig`
fields) into EasyDeL's `PPOConfig`, with the paper's PPO values (`PAPER_PPO`). `PPOBaselineTrainer`
is EasyDeL's `PPOTrainer` (value head `CausalLMWithValueHead` on the policy's last hidden state,
zero-initialised; GAE; clipped policy and value losses; KL to the start policy as a reward term) with:

- a fresh sampling key per step and the compiled ``generate`` kept across steps
  (`trainer.generation.CompiledGeneration`, as `VinePPOTrainer`: batch k samples with the same key);
- the dataset's columns (``answer``) reaching the reward functions (`trainer.task_fields`);
- ``num_ppo_epochs`` updates per batch: EasyDeL 0.3.0 ignores the field and makes one, so
  ``max_training_steps`` counts updates as it does for `VinePPOTrainer`;
- ``history``: one dict of metrics per batch.

Checked against Schulman et al. 2017 in ``easydel/trainers/proximal_policy_optimization_trainer``
(0.3.0), nothing else needed fixing: the policy loss is ``max(-A r, -A clip(r))`` = -min(...) for
both signs of A (``_fn.py`` 257-259); the ratio's old log-probs and the value clip's old values
come from one forward of the rollout policy before the batch's first update
(``ppo_trainer.py`` 681-686); GAE is ``delta_t = r_t + gamma V_{t+1} m_{t+1} - V_t``,
``A_t = delta_t + gamma lam A_{t+1} m_{t+1}``, returns ``A + V`` (``_compute_gae``), the score
added at the last response token (the EOS, which ``completion_mask`` keeps); the value loss is
``0.5 max((V - R)^2, (V_old + clip(V - V_old, +-c) - R)^2)`` (``_fn.py`` 261-264); V at response
position t reads the hidden state of the token before it, so it values the state prompt +
response[:t] (``_fn.py`` 173-174). Differences from the reference left as they are: the critic
shares the policy's trunk (loss ``pg + vf_coef * vf``; the reference trains a separate critic
model, src/treetune/models/pretrained_with_value_head.py, whose head has a bias and starts
N(0, 1/sqrt(hidden + 1))), whitening uses the biased variance, and the KL is a reward penalty,
not a loss term (``beta`` is 0 in `vinekv.configs.train.DEFAULT_TRAINER`).

`critic_values` reads the trained critic's V(s) at given states.
"""

from __future__ import annotations

import dataclasses
import time
import typing as tp
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from easydel.infra.base_module import EasyDeLBaseModule
from easydel.infra.base_state import EasyDeLState
from easydel.infra.loss_utils import LossMetrics
from easydel.trainers.proximal_policy_optimization_trainer import PPOConfig, PPOTrainer

from vinekv.trainer.generation import CompiledGeneration
from vinekv.trainer.task_fields import ROW_COLUMN, FieldInjector, KeepsRowIndex, row_fields, with_row_index
from vinekv.trainer.vineppo_config import VinePPOConfig
from vinekv.trainer.vineppo_trainer import _floats, epochs_this_batch, run_ppo_epochs

# The VinePPO paper's PPO runs (McGill-NLP/VinePPO at efe7228): configs/trainers/ppo_MATH.jsonnet
# sets gamma 1.0 (line 57), lam 0.96 (line 58) and cliprange_value 0.2 (line 61), but every
# polIter_*_ppo_{GSM8K,MATH}.jsonnet imports trainers/lam1.jsonnet last (e.g.
# configs/polIter_rho1bSft2_ppo_MATH.jsonnet line 174, polIter_rho1bSft2_ppo_GSM8K.jsonnet line 22),
# which sets lam: 1. The critic's value loss there is 0.5 * max of the clipped and unclipped squared
# errors (src/treetune/trainers/ppo_trainer.py lines 1004-1017), as EasyDeL's; it is a separate
# model, so its vf_coef (0.1, PPOHParams line 123) scales nothing; here it weighs the value loss
# on the shared trunk (EasyDeL's default, also 0.1).
PAPER_PPO: dict[str, tp.Any] = {
    "gamma": 1.0,
    "lam": 1.0,
    "cliprange_value": 0.2,
    "vf_coef": 0.1,
    "whiten_rewards": False,
}

# Settings of the other methods that PPOConfig names otherwise (VinePPOConfig -> PPOConfig).
RENAMED = {
    "vineppo_ppo_epochs": "num_ppo_epochs",
    "epsilon": "cliprange",
    "beta": "kl_coef",
    "vineppo_whiten_advantages": "whiten_advantages",
}

# What VinePPOConfig pins for the compiled generate when unset (`VinePPOConfig._pin_sampling`).
PINNED_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


def ppo_config(settings: Mapping[str, tp.Any]) -> PPOConfig:
    """EasyDeL's `PPOConfig` training like the VinePPO methods trained with ``settings``.

    ``settings``: `VinePPOConfig` fields (what `vinekv compare` gives every method) and optionally
    `PPOConfig`'s own. Fields both configs have pass as they are (job, batch of
    ``total_batch_size`` prompts x ``num_return_sequences``, lengths, learning rate, optimizer),
    `RENAMED` ones are renamed, VinePPO-only ones (``vineppo_*``, ``lite_*``, ``loss_type``) are
    dropped. Unset, they take `VinePPOConfig`'s defaults; the sampling of the compiled generate
    ``generation_{temperature,top_p,top_k}`` falls back to ``temperature``/``top_p``/``top_k``,
    then to `PINNED_SAMPLING`. `PAPER_PPO` gives gamma, lambda and the value loss's settings.
    """
    vine = {f.name: f for f in dataclasses.fields(VinePPOConfig)}
    ppo = {f.name for f in dataclasses.fields(PPOConfig)}
    unknown = sorted(set(settings) - set(vine) - ppo)
    if unknown:
        raise ValueError(f"settings {unknown} are neither VinePPOConfig nor PPOConfig fields")
    if settings.get("use_esurge_generation"):
        raise ValueError(
            "use_esurge_generation must be False: the PPO baseline samples with the compiled generate "
            "(a fresh key per step)"
        )
    defaults = {name: vine[name].default for name in (*RENAMED, "num_return_sequences", "temperature", "top_p")}
    given = {**defaults, **settings}
    fields = {RENAMED.get(k, k): v for k, v in given.items() if RENAMED.get(k, k) in ppo}
    for name, pinned in PINNED_SAMPLING.items():
        if given.get(f"generation_{name}") is None:
            fields[f"generation_{name}"] = pinned if given.get(name) is None else given[name]
    return PPOConfig(**{**PAPER_PPO, **fields, "use_esurge_generation": False})


class PPOBaselineTrainer(CompiledGeneration, KeepsRowIndex, PPOTrainer):
    """EasyDeL's `PPOTrainer` with fresh sampling keys, dataset columns for the reward functions,
    ``num_ppo_epochs`` updates per batch and a ``history`` of per-batch metrics.

    ``history`` entries: ``step`` (updates so far), ``loss``, the batch's ``score_mean`` (reward),
    ``mean_kl``, ``completion_length``, EasyDeL's timings, the last update's ``policy_loss``,
    ``value_loss``, ``pg_clipfrac``, ``vf_clipfrac``, ``approx_kl``, ``mean_entropy``,
    ``ratio_mean``, and ``step_seconds`` (wall time of the batch).
    """

    arguments: PPOConfig

    def __init__(
        self,
        arguments: PPOConfig,
        model: tp.Any,
        reward_funcs: tp.Any,
        train_dataset: tp.Any = None,
        processing_class: tp.Any = None,
    ):
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        self.history: list[dict[str, float]] = []
        self.task_fields = FieldInjector()
        self._train_rows = with_row_index(train_dataset)
        wrapped = [f if isinstance(f, EasyDeLState | EasyDeLBaseModule) else self.task_fields.wrap(f) for f in funcs]
        super().__init__(
            arguments=arguments,
            model=model,
            reward_funcs=wrapped,
            train_dataset=self._train_rows,
            processing_class=processing_class,
        )

    def _preprocess_batch_input(
        self, state: EasyDeLState, batch: dict[str, jax.Array], is_train: bool
    ) -> tuple[dict[str, jax.Array], dict[str, float | int | str]]:
        """EasyDeL's rollout, scoring and GAE, each completion scored with its prompt's dataset row."""
        prompts = batch["input_ids"].shape[0]
        if is_train and ROW_COLUMN in batch and self._train_rows is not None:
            rows = np.asarray(jax.device_get(batch[ROW_COLUMN]))
            fields = [row_fields(self._train_rows[int(i)]) for i in rows]
        else:
            fields = [{} for _ in range(prompts)]
        self.task_fields.fields = [f for f in fields for _ in range(self.num_generations)]
        return super()._preprocess_batch_input(state, batch, is_train)

    def _execute_train_step(self, state, batch) -> tuple[EasyDeLState, LossMetrics, BaseException | None]:
        """Rollout, scoring and GAE once, then ``num_ppo_epochs`` updates on the batch (each
        advances ``state.step``); the step's metrics are the last update's plus the rollout's."""
        start = time.perf_counter()
        state, metrics, informations, error = run_ppo_epochs(
            self,
            state,
            lambda: self._preprocess_batch_input(state=state, batch=batch, is_train=True),
            epochs_this_batch(self, state, self.arguments.num_ppo_epochs),
        )
        if error is not None:
            return state, metrics, error
        informations.update(metrics.other_metrics or {})
        informations["step_seconds"] = time.perf_counter() - start
        self.history.append(
            {"step": int(jax.device_get(state.step)), "loss": float(metrics.loss), **_floats(informations)}
        )
        return state, metrics.replace(other_metrics=informations), None


def critic_values(
    state: EasyDeLState,
    prompt_ids: tp.Sequence[int] | np.ndarray,
    response_ids: tp.Sequence[int] | np.ndarray,
    positions: tp.Sequence[int] | np.ndarray,
) -> np.ndarray:
    """The critic's values V(s) of the states ``prompt + response[:p]`` for ``p`` in ``positions``.

    Args:
      state: a PPO state (its model a `CausalLMWithValueHead`): the one ``train()`` returns or
        a step hook sees. Not the trainer's ``model_state``: EasyDeL donates it to the first
        update and never replaces it.
      prompt_ids: ``[Lp]`` prompt token ids (no padding), ``Lp >= 1``.
      response_ids: ``[Lr]`` response token ids (no padding).
      positions: ``[n]`` response prefix lengths in ``[0, Lr]`` (0: the prompt alone).

    Returns:
      ``[n]`` float64: the value head on the final hidden state of each state's last token, from
      one forward over ``prompt + response`` (causal, so later tokens do not change it), the
      quantity PPO's GAE uses as V at response position ``p``.
    """
    module = state.model
    if not hasattr(module, "value_head"):
        raise TypeError(f"{type(module).__name__} has no value_head: critic_values needs a PPO state")
    prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
    response = np.asarray(response_ids, np.int32).reshape(-1)
    at = np.asarray(positions, np.int64).reshape(-1)
    if prompt.size == 0:
        raise ValueError("prompt_ids is empty: a state needs at least one token")
    if at.size and (at.min() < 0 or at.max() > response.size):
        raise ValueError(f"positions must lie in [0, {response.size}] (response length), got {at.tolist()}")
    ids = jnp.asarray(np.concatenate([prompt, response])[None])
    with module.mesh:
        out = module(input_ids=ids, attention_mask=jnp.ones_like(ids), output_hidden_states=True)
        hidden = out.last_hidden_state if out.last_hidden_state is not None else out.hidden_states[-1]
        values = module.value_head(hidden)[0, :, 0]
    return np.asarray(values, np.float64)[prompt.size - 1 + at]
