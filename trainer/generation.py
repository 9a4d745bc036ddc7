"""`CompiledGeneration`: what EasyDeL's trainers need to sample RL rollouts with the compiled
``generate``, as a mixin placed before the EasyDeL trainer class (``super()`` is that class):

- a fresh sampling key per step, ``fold_in(PRNGKey(generation_seed), step)`` (EasyDeL's
  ``generate`` defaults to ``PRNGKey(0)`` on every call);
- the compiled function kept across steps (EasyDeL drops it after every call).

`trainer.vineppo_trainer.VinePPOTrainer` and `trainer.ppo_baseline.PPOBaselineTrainer` use it.
"""

from __future__ import annotations

import typing as tp

import jax
from easydel.infra.base_state import EasyDeLState
from easydel.utils.compiling_utils import ejit
from eformer import common_types


class CompiledGeneration:
    """Mixin for an EasyDeL trainer (listed before it in the bases)."""

    def create_generate_function(
        self,
        generation_config: tp.Any = None,
        *,
        shard_inputs: bool = True,
        config_overrides: dict[str, tp.Any] | None = None,
        accept_model_kwargs: bool = False,
        **generate_kwargs: tp.Any,
    ) -> tp.Callable:
        """EasyDeL's compiled ``generate`` with the key ``fold_in(PRNGKey(generation_seed), step)``.

        EasyDeL's ``generate`` defaults to ``PRNGKey(0)`` on every call, so every step would
        resample the same completions for the same prompts. Multimodal (``model_kwargs``) and
        explicit-key calls keep EasyDeL's function.
        """
        if accept_model_kwargs or "prng_key" in generate_kwargs:
            return super().create_generate_function(
                generation_config,
                shard_inputs=shard_inputs,
                config_overrides=config_overrides,
                accept_model_kwargs=accept_model_kwargs,
                **generate_kwargs,
            )
        config = self._prepare_generation_config(generation_config)
        if config is not None:
            for key, value in (config_overrides or {}).items():
                setattr(config, key, value)
            for key, value in generate_kwargs.items():
                if hasattr(config, key):
                    setattr(config, key, value)
        config_kwargs = {} if config is None else {"generation_config": config}
        base_key = jax.random.PRNGKey(self.arguments.generation_seed or 0)
        replicated = jax.sharding.NamedSharding(self.model.mesh, jax.sharding.PartitionSpec())

        @ejit(in_shardings=(self.state_shardings, replicated, replicated), out_shardings=(replicated,) * 3)
        def generate(state: EasyDeLState, input_ids: jax.Array, attention_mask: jax.Array):
            module = state.model
            with module.mesh:
                manager = getattr(module.config, "partition_manager", None) if shard_inputs else None
                if manager is not None:  # as EasyDeL's: prompts sharded over batch and sequence
                    axes = [common_types.BATCH, common_types.SEQUENCE_PARALLEL]
                    input_ids = manager.shard(input_ids, axes=axes, mode=common_types.MODE_PREFILL)
                    attention_mask = manager.shard(attention_mask, axes=axes, mode=common_types.MODE_PREFILL)
                outputs = module.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    prng_key=jax.random.fold_in(base_key, state.step),
                    **config_kwargs,
                    **generate_kwargs,
                )
            sequences = outputs.sequences if hasattr(outputs, "sequences") else outputs
            return sequences, input_ids, attention_mask

        return generate

    def release_generation_runtime(self, *, state: EasyDeLState | None = None, **kwargs: tp.Any) -> None:
        """EasyDeL calls this after every generation and drops its compiled ``generate`` there,
        so each step traced and compiled it again (about 1 s a step for the tiny task model, most
        of GRPO's step). The compiled path holds no KV between calls, so it is kept; eSurge's
        runtime is released as EasyDeL does."""
        if self.arguments.use_esurge_generation:
            super().release_generation_runtime(state=state, **kwargs)
