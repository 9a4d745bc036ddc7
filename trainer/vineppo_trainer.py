"""`VinePPOTrainer`: EasyDeL's GRPO trainer with VinePPO credit assignment.

Each training step:

1. generates the group as `GRPOTrainer` does (its compiled `generate`, with the sampling key
   folded from the state's step so every step draws fresh samples), and scores it;
2. captures every rollout's KV and keeps it (``memory``), spills it to the snapshot store
   (``disk``), or keeps only tokens and re-prefills later (``recompute``);
3. samples K branches per state (step starts in ``full`` mode, anchors in ``lite``) and folds
   their returns into MC values (`trainer.value_estimation`);
4. turns values into per-token advantages (`trainer.advantages`), optionally baselined and
   whitened over the batch;
5. adds the rollout policy's per-token log-probs (``old_per_token_logps``), so the PPO ratio
   and clipping act, and runs ``vineppo_ppo_epochs`` updates on the batch.

``vineppo_offline_run`` trains from a store run whose trajectories already carry MC values
(``fields.mc``, written by `vinekv.replay.branch_replay.replay_run` / ``vinekv replay``) instead of
generating: each prompt of the batch takes the stored trajectories of the same prompt tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
import typing as tp

import jax
import jax.numpy as jnp
import numpy as np
from easydel.infra.base_module import EasyDeLBaseModule
from easydel.infra.base_state import EasyDeLState
from easydel.infra.errors import EasyDeLBreakRequest, EasyDeLTimerError
from easydel.infra.loss_utils import LossMetrics
from easydel.trainers.group_relative_policy_optimization.grpo_trainer import GRPOTrainer
from easydel.trainers.metrics import NullProgressBar
from easydel.trainers.trainer_protocol import TrainerConfigureFunctionOutput
from easydel.trainers.training_utils import normalize_generation_model_kwargs
from easydel.utils.compiling_utils import ejit
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from vinekv.kvstore.backends.factory import is_local
from vinekv.kvstore.fingerprint import policy_fingerprint
from vinekv.kvstore.policy import check_policy
from vinekv.kvstore.store import SnapshotStore
from vinekv.replay.branch_replay import ReplayConfig, score_completions
from vinekv.replay.config import RolloutRecipe
from vinekv.replay.engines import BranchEngine, esurge_internals, open_engine
from vinekv.replay.rewards import weighted_sum
from vinekv.replay.steps import Splitter
from vinekv.replay.values import MCRecord, branch_returns
from vinekv.trainer.advantages import METHOD_NAMES, normalize_batch, trajectory_advantages
from vinekv.trainer.async_replay import PolicyBlueprint, ReplayWorker, WorkerSetup
from vinekv.trainer.generation import CompiledGeneration
from vinekv.trainer.losses import ppo_token_loss
from vinekv.trainer.ppo_step import STATIC_ARGNUMS, ppo_step
from vinekv.trainer.rollouts import Rollout, pad_rows, split_rollouts
from vinekv.trainer.task_fields import ROW_COLUMN, FieldInjector, KeepsRowIndex, row_fields, with_row_index
from vinekv.trainer.value_estimation import (
    EstimationStats,
    estimate_values,
    needs_entropy,
    spill_rollouts,
    stored_values,
)
from vinekv.trainer.vineppo_config import VinePPOConfig

logger = logging.getLogger(__name__)

StepCallback = tp.Callable[[EasyDeLState, dict[str, float]], dict[str, float] | None]
"""``(state after the batch's updates, the step's metrics) -> extra metrics or None``; extras join
the step's entry in ``history`` and EasyDeL's metric loggers (wandb, TensorBoard)."""


class VinePPOTrainer(CompiledGeneration, KeepsRowIndex, GRPOTrainer):
    """GRPO trainer whose advantages come from VinePPO's Monte-Carlo values.

    Takes `GRPOTrainer`'s arguments plus ``step_splitter`` (full mode: a callable mapping a
    response text to its step-start character offsets, instead of ``vineppo_step_delimiter``).
    ``history`` holds one dict of metrics per training step (loss, rewards, ``vineppo/*``);
    ``step_callbacks`` are called after each batch's updates (`StepCallback`).
    Reward functions must be Python callables (branches are scored with them); reward models
    work only with ``vineppo_mode='off'``.
    """

    arguments: VinePPOConfig

    def __init__(
        self,
        arguments: VinePPOConfig,
        model: tp.Any,
        reward_funcs: tp.Any,
        train_dataset: tp.Any = None,
        eval_dataset: tp.Any = None,
        processing_class: tp.Any = None,
        reward_processing_classes: tp.Any = None,
        data_tokenize_fn: tp.Callable | None = None,
        *,
        step_splitter: Splitter | None = None,
    ):
        if not isinstance(arguments, VinePPOConfig):
            raise TypeError(f"arguments must be a VinePPOConfig, got {type(arguments).__name__}")
        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        if arguments.vineppo_mode != "off":
            bad = [type(f).__name__ for f in funcs if not _is_python_reward(f)]
            if bad:
                raise ValueError(
                    f"vineppo_mode={arguments.vineppo_mode!r} scores branches with Python reward functions; "
                    f"got {bad} (reward models work only with vineppo_mode='off')"
                )
        self.step_splitter = step_splitter
        self.step_callbacks: list[StepCallback] = []
        self._given_model = model.model if isinstance(model, EasyDeLState) else model  # see resumed_into
        self.history: list[dict[str, float]] = []
        self.interrupted = False  # set when training ended on an interrupt (EasyDeL saved and returned)
        self._session = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"  # store run prefix
        train_dataset, eval_dataset = with_row_index(train_dataset), with_row_index(eval_dataset)
        self._dataset_rows = {True: train_dataset, False: eval_dataset}
        self.task_fields = FieldInjector()  # GRPO's own reward calls get the rows' fields too
        wrapped = [self.task_fields.wrap(f) if _is_python_reward(f) else f for f in funcs]
        super().__init__(
            arguments=arguments,
            model=model,
            reward_funcs=wrapped if isinstance(reward_funcs, list) else wrapped[0],
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            data_tokenize_fn=data_tokenize_fn,
        )
        if self.pruning_module is not None:
            raise NotImplementedError("VinePPOTrainer does not support pruning_module")
        weights = arguments.reward_weights or [1.0] * len(funcs)
        self.branch_reward = weighted_sum(funcs, weights) if arguments.vineppo_mode != "off" else None
        self._replay_worker: ReplayWorker | None = None
        self._worker_setup = (
            WorkerSetup(
                arguments.vineppo_store,
                PolicyBlueprint.of(self.model_state.model),
                processing_class,
                funcs,
                weights,
                step_splitter,
                arguments.esurge_options(),
                dict(arguments.vineppo_async_worker_env or {}),
            )
            if arguments.vineppo_async_replay
            else None
        )
        if self._worker_setup is not None:
            self._worker_setup.check_picklable()
        self._pending: _PendingBatch | None = None  # async: generated, its values being computed
        self._lookahead: tp.Any = None  # async: the next training batch, taken early to generate it
        self._generations = 0  # async: index of the next batch to generate
        self.rollout_stop_ids = rollout_stop_ids(self._eos_token_id, arguments.generation_extra_kwargs)
        self.initial_fingerprint = policy_fingerprint(self.model_state.model)
        self.snapshot_store: SnapshotStore | None = None
        self._branch_engine: BranchEngine | None = None
        self._generated_kv: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._generation_engines: list[tp.Any] = []  # eSurge engines EasyDeL generated with
        if arguments.vineppo_offline_run is not None:
            self.snapshot_store = SnapshotStore.open(arguments.vineppo_store, mode="r")
            self._offline_index = self._index_offline_run(arguments.vineppo_offline_run)
        elif arguments.vineppo_mode != "off" and arguments.vineppo_cache_strategy == "disk":
            durability = arguments.vineppo_spill_durability
            if durability == "flush" and not is_local(arguments.vineppo_store):
                logger.info("vineppo_store %s is not a local path; group commit needs one", arguments.vineppo_store)
                durability = "trajectory"
            self.snapshot_store = SnapshotStore.open(
                arguments.vineppo_store,
                mode="a",
                codec=arguments.vineppo_codec,
                max_inflight_bytes=arguments.vineppo_spill_buffer_mb * 2**20,
                durability=durability,
            )

    def close(self) -> None:
        """Closes the snapshot store (waits for queued spills, releases its writer lock), the
        branch engine and the eSurge engines generation used (their worker processes). Call it
        when done with the trainer (a later `train()` would need a new trainer)."""
        if self._replay_worker is not None:
            self._replay_worker.close()
            self._replay_worker = None
        pending, self._pending = self._pending, None
        store, self.snapshot_store = self.snapshot_store, None
        if store is not None:
            try:
                if pending is not None and pending.run in store.runs():
                    store.delete_run(pending.run)  # generated, never trained on (and never valued)
            finally:
                store.close()
        if self._branch_engine is not None:
            self._branch_engine.close()
            self._branch_engine = None
        while self._generation_engines:
            esurge_internals.shutdown(self._generation_engines.pop())

    def generate_unified(self, *args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        """EasyDeL's generation. With ``use_esurge_generation`` and a cache strategy that keeps
        the KV in memory (``memory`` / ``recompute``, no entropy selection) the KV eSurge computed
        for each finished rollout is read out of its page pool before the pages are freed
        (`esurge_internals.capture_generations`): value estimation then needs no capture forward
        for it. eSurge's page pool is sized by ``esurge_options().budget_bytes()`` (16 MiB on CPU)."""
        config = self.arguments
        if not config.use_esurge_generation:
            return super().generate_unified(*args, **kwargs)
        state = kwargs.get("state") or self.model_state
        keep = config.vineppo_mode != "off" and config.vineppo_cache_strategy != "disk"
        keep = keep and not needs_entropy(config.replay_config())
        budget = config.esurge_options().budget_bytes()
        with esurge_internals.capture_generations(type(state.model), budget, self._generation_engines) as captured:
            results = super().generate_unified(*args, **kwargs)
        if keep and config.vineppo_offline_run is None:
            for tokens, keys, values in captured.values():
                self._generated_kv[tuple(tokens.tolist())] = (keys, values)
        return results

    def branch_engine(self, model: EasyDeLBaseModule) -> BranchEngine:
        """The branch engine (``vineppo_engine``, opened on first use and kept across steps),
        serving ``model``'s weights."""
        if self._branch_engine is None:
            self._branch_engine = open_engine(
                self.arguments.vineppo_engine,
                model,
                tokenizer=self.processing_class,
                esurge_options=self.arguments.esurge_options(),
            )
        else:
            self._branch_engine.update_model(model)
        return self._branch_engine

    def _apply_runtime_model_config_overrides(self) -> None:
        """BaseTrainer's hook between loading a checkpoint and compiling the steps."""
        if self._resumed_from_checkpoint and self._given_model is not None:
            self.model_state = resumed_into(self.model_state, self._given_model)
        super()._apply_runtime_model_config_overrides()

    # -- progress: one bar that moves per batch ------------------------------------------------

    def create_progress_bar(self, total: int, desc: str = "", disabled: bool = False) -> tp.Any:
        """EasyDeL's training bar moves every ``log_steps`` updates; this one moves per batch and
        shows the batch's reward and MC values (other bars are EasyDeL's)."""
        if desc != "training process" or disabled:
            return super().create_progress_bar(total, desc, disabled)
        done = min(int(jax.device_get(self.model_state.step)), total)  # > 0 when resumed from a checkpoint
        method = METHOD_NAMES[self.arguments.vineppo_mode]
        self._batch_bar = tqdm(total=total, initial=done, desc=f"{method} updates", unit="update")
        return NullProgressBar()

    def _prepare_training_output(self, state: EasyDeLState, run_exception: BaseException | None = None) -> tp.Any:
        """EasyDeL's end of training (it saves a checkpoint after an interrupt, then returns as if
        done); ``interrupted`` tells the caller it was an interrupt (Ctrl-C)."""
        self.interrupted = isinstance(run_exception, KeyboardInterrupt)
        return super()._prepare_training_output(state, run_exception)

    def _fast_forward_batches(self, data_iter: tp.Any, dataloader: tp.Any, num_batches: int) -> tp.Any:
        """On resume EasyDeL skips one batch per optimizer step; a batch here makes
        ``vineppo_ppo_epochs`` steps (the last one of a run maybe fewer), so a state at step N
        has consumed ceil(N / epochs) batches."""
        return super()._fast_forward_batches(
            data_iter, dataloader, batches_done(num_batches, self.arguments.vineppo_ppo_epochs)
        )

    def _advance_bar(self, entry: dict[str, float]) -> None:
        bar = getattr(self, "_batch_bar", None)
        if bar is None:
            return
        bar.update(min(self.arguments.vineppo_ppo_epochs, bar.total - bar.n))
        if "vineppo/states" in entry:
            bar.set_postfix(
                reward=f"{entry['vineppo/trajectory_reward_mean']:.3f}",
                V=f"{entry['vineppo/mc_value_mean']:.3f}",
                states=int(entry["vineppo/states"]),
                refresh=False,
            )
        if bar.n >= bar.total:
            bar.close()

    # -- the PPO step -------------------------------------------------------------------------

    def configure_functions(self) -> TrainerConfigureFunctionOutput:
        """GRPO's jitted train/eval steps replaced by `trainer.ppo_step.ppo_step` with `ppo_token_loss`.

        ``super()`` still builds ``compute_refmodel_logps``, the checkpoint manager and GRPO's static
        argument tuples; both steps are rebuilt as GRPO builds them and the loss is appended to both
        tuples (position 19), so `_execute_train_step`'s call is unchanged.
        """
        out = super().configure_functions()
        replicated = NamedSharding(mesh=self.model.mesh, spec=PartitionSpec())
        train = ejit(
            ppo_step,
            in_shardings=(self.state_shardings, replicated),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
            static_argnums=STATIC_ARGNUMS,
        )
        evaluate = ejit(
            ppo_step,
            in_shardings=(self.state_shardings, replicated),
            out_shardings=replicated,
            static_argnums=STATIC_ARGNUMS,
        )
        train.static_argnums_ = evaluate.static_argnums_ = STATIC_ARGNUMS
        self._train_shared_fn_static_args = (*self._train_shared_fn_static_args, ppo_token_loss)
        self._eval_shared_fn_static_args = (*self._eval_shared_fn_static_args, ppo_token_loss)
        return TrainerConfigureFunctionOutput(
            sharded_training_step_function=train,
            sharded_evaluation_step_function=evaluate,
            mesh=out.mesh,
            checkpoint_manager=out.checkpoint_manager,
        )

    # -- preprocessing -------------------------------------------------------------------------

    def _prompt_fields(self, batch: dict[str, jax.Array], is_train: bool) -> list[dict[str, tp.Any]]:
        """One dict of task fields per prompt of ``batch``: its dataset row but the prompt."""
        prompts = batch["input_ids"].shape[0]
        dataset = self._dataset_rows[is_train]
        if ROW_COLUMN not in batch or dataset is None:
            return [{} for _ in range(prompts)]
        return [row_fields(dataset[int(i)]) for i in np.asarray(jax.device_get(batch[ROW_COLUMN]))]

    def _preprocess_batch_input(
        self, state: EasyDeLState, batch: dict[str, jax.Array], is_train: bool
    ) -> tuple[dict[str, jax.Array], dict[str, float | int | str]]:
        args = self.arguments
        prompt_fields = self._prompt_fields(batch, is_train)
        if args.vineppo_offline_run is not None and is_train:
            return self._offline_batch(state, batch)
        if not is_train:
            return self._generate(state, batch, prompt_fields, is_train=False)[:2]
        if args.vineppo_mode == "off":
            out, metrics, completion_mask, _ = self._generate(state, batch, prompt_fields)
            sequence_adv = np.asarray(jax.device_get(out["advantages"]), dtype=np.float64)
            out = _prompts_per_row(out)
            self._add_rollout_logps(state, out, metrics)
            out["advantages"], signal = self._final_advantages(sequence_adv[:, None] * completion_mask, completion_mask)
            return out, {**metrics, **signal}
        generated = self._rollouts(state, batch, prompt_fields)
        values, stats = estimate_values(
            args.vineppo_cache_strategy,
            state.model,
            self.processing_class,
            self.branch_reward,
            generated.rollouts,
            generated.config,
            store=self.snapshot_store,
            run=self._step_run(int(jax.device_get(state.step))),
            keep_run=args.vineppo_keep_snapshots,
            rewards=generated.rewards,
            fields=generated.fields,
            splitter=self.step_splitter,
            batch_rows=args.vineppo_capture_rows,
            engine=self.branch_engine(state.model),
            generated_kv=generated.generated_kv,
        )
        return self._valued(generated, values, stats)

    def _generate(
        self,
        state: EasyDeLState,
        batch: dict[str, jax.Array],
        prompt_fields: list[dict[str, tp.Any]],
        is_train: bool = True,
    ) -> tuple[
        dict[str, jax.Array], dict[str, tp.Any], np.ndarray, dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]
    ]:
        """GRPO's generation and scoring: ``(out, metrics, completion_mask [N, Lc], generated KV)``."""
        self.task_fields.fields = [f for f in prompt_fields for _ in range(self.num_generations)]
        self._generated_kv = {}
        out, metrics = super()._preprocess_batch_input(state, batch, is_train)
        generated_kv, self._generated_kv = self._generated_kv, {}
        return out, metrics, np.asarray(jax.device_get(out["completion_mask"])), generated_kv

    def _rollouts(
        self, state: EasyDeLState, batch: dict[str, jax.Array], prompt_fields: list[dict[str, tp.Any]]
    ) -> _GeneratedBatch:
        """A generated batch by ``state``'s policy: its rollouts, their returns and the settings
        its branches are sampled with (keyed by ``state.step``)."""
        out, metrics, completion_mask, generated_kv = self._generate(state, batch, prompt_fields)
        rollouts = split_rollouts(
            *jax.device_get((out["prompt_ids"], out["prompt_mask"], out["completion_ids"], out["completion_mask"]))
        )
        fields = [prompt_fields[r.group] for r in rollouts]
        out = _prompts_per_row(out)
        self._add_rollout_logps(state, out, metrics)
        config = self.arguments.replay_config(
            seed=self._replay_seed(state), stop_token_ids=tuple(self.rollout_stop_ids)
        )
        start = time.perf_counter()
        rewards = self._score_rollouts(rollouts, fields)
        metrics["vineppo/seconds/rollout_score"] = time.perf_counter() - start
        return _GeneratedBatch(out, metrics, completion_mask, rollouts, fields, rewards, config, generated_kv)

    def _valued(
        self, generated: _GeneratedBatch, values: list[MCRecord], stats: EstimationStats
    ) -> tuple[dict[str, jax.Array], dict[str, tp.Any]]:
        """The training batch of a generated batch with its MC values."""
        mask = generated.completion_mask
        start = time.perf_counter()
        token_adv = self._token_advantages(generated.rollouts, values, generated.rewards, mask.shape)
        advantages, signal = self._final_advantages(token_adv, mask)
        metrics = {
            **generated.metrics,
            **_estimation_metrics(values, stats, generated.rollouts, generated.rewards),
            **signal,
            "vineppo/seconds/advantages": time.perf_counter() - start,
        }
        return {**generated.out, "advantages": advantages}, metrics

    def _step_run(self, step: int) -> str:
        """The store run of the batch generated at ``step`` (``disk``)."""
        return f"{self._session}-step{step:07d}"

    def _replay_seed(self, state: EasyDeLState) -> int:
        """Branch seed of this step: fresh every step, reproducible from ``generation_seed``."""
        return (self.arguments.generation_seed or 0) * 1_000_003 + int(jax.device_get(state.step))

    def _score_rollouts(self, rollouts: list[Rollout], fields: list[dict[str, tp.Any]]) -> np.ndarray:
        """``[N]`` returns of the rollouts: scored like their branches (`score_completions`, with
        each rollout's task fields), and ``vineppo_unfinished_reward`` for a rollout cut off by
        the token budget (not ending in a stop token) when that is set, as for branches."""
        rewards = np.zeros(len(rollouts))
        for group in sorted({r.group for r in rollouts}):
            rows = [i for i, r in enumerate(rollouts) if r.group == group]
            completions = [rollouts[i].response_ids for i in rows]
            rewards[rows] = score_completions(
                self.branch_reward, self.processing_class, rollouts[rows[0]].prompt_ids, completions, fields[rows[0]]
            )
        finished = np.array([int(r.response_ids[-1]) in self.rollout_stop_ids for r in rollouts])
        return branch_returns(rewards, finished, self.arguments.vineppo_unfinished_reward)

    def _token_advantages(
        self, rollouts: list[Rollout], values: list[MCRecord], rewards: np.ndarray, shape: tuple[int, int]
    ) -> np.ndarray:
        """``[N, Lc]`` token advantages; rows without a rollout (masked-out completions) stay 0."""
        args = self.arguments
        rows = [
            trajectory_advantages(
                args.vineppo_mode,
                len(r.response_ids),
                v.response_positions,
                v.stats.mean,
                float(reward),
                args.vineppo_gamma,
                args.vineppo_lambda,
            )
            for r, v, reward in zip(rollouts, values, rewards, strict=True)
        ]
        return pad_rows(rows, shape[1], at=[r.row for r in rollouts], height=shape[0])

    def _final_advantages(
        self, token_adv: np.ndarray, completion_mask: np.ndarray
    ) -> tuple[jax.Array, dict[str, float]]:
        """Baselined/whitened over the batch's real tokens, cut to ``max_loss_completion_tokens``
        (GRPO's loss cuts the completions, but not per-token advantages or old log-probs), and
        how much signal the batch carries before that: ``vineppo/advantage_nonzero`` (share of
        response tokens with A != 0) and ``vineppo/advantage_abs_mean`` (mean |A| over them)."""
        args = self.arguments
        real = np.asarray(completion_mask, bool)
        raw = np.abs(np.asarray(token_adv, np.float64))[real]
        signal = {
            "vineppo/advantage_nonzero": float((raw > 1e-12).mean()) if raw.size else 0.0,
            "vineppo/advantage_abs_mean": float(raw.mean()) if raw.size else 0.0,
        }
        adv = normalize_batch(token_adv, completion_mask, args.vineppo_baseline, args.vineppo_whiten_advantages)
        return self._cut(jnp.asarray(adv, dtype=jnp.float32)), signal

    def _cut(self, per_token: jax.Array) -> jax.Array:
        """``[N, Lc]`` cut to ``max_loss_completion_tokens`` columns when set."""
        limit = self.arguments.max_loss_completion_tokens
        return per_token if limit is None else per_token[:, :limit]

    def _add_rollout_logps(self, state: EasyDeLState, out: dict[str, jax.Array], metrics: dict[str, tp.Any]) -> None:
        """``out["old_per_token_logps"]``: the rollout policy's (``state``'s) log-probs of the
        completions, cut like the loss's; their seconds as ``vineppo/seconds/logps``."""
        start = time.perf_counter()
        out["old_per_token_logps"] = jax.block_until_ready(self._cut(self._completion_logps(state, out)))
        metrics["vineppo/seconds/logps"] = time.perf_counter() - start

    def _completion_logps(self, state: EasyDeLState, out: dict[str, jax.Array]) -> jax.Array:
        """Per-token log-probs ``[N, Lc]`` of the completions (prompts one row per completion)
        under ``state``, by the function GRPO uses for reference log-probs (the loss computes the
        current ones the same way), in chunks of ``ref_logps_chunk_size`` rows when set."""
        width = out["prompt_ids"].shape[1]
        if width != self.arguments.max_prompt_length:
            raise ValueError(f"prompts are padded to {width} tokens, not max_prompt_length")
        ids = jnp.concatenate([out["prompt_ids"], out["completion_ids"]], axis=1)
        mask = jnp.concatenate([out["prompt_mask"], out["completion_mask"]], axis=1)
        kwargs = normalize_generation_model_kwargs(None, model_callable=state.model.__call__)
        chunk = self.ref_logps_chunk_size or ids.shape[0]
        parts = [
            self.compute_refmodel_logps(
                state.graphstate, state.graphother, ids[lo : lo + chunk], mask[lo : lo + chunk], kwargs
            )
            for lo in range(0, ids.shape[0], chunk)
        ]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)

    # -- offline: MC-annotated trajectories from a store ----------------------------------------

    def _index_offline_run(self, run: str) -> dict[tuple[int, ...], list[str]]:
        """Stored trajectories of ``run`` by prompt tokens; refuses other policies' trajectories."""
        store, args = self.snapshot_store, self.arguments
        index: dict[tuple[int, ...], list[str]] = {}
        for tid in store.trajectories(run):
            node = store.trajectory(run, tid)
            if not args.vineppo_allow_stale:
                check_policy(
                    node.fingerprint,
                    self.initial_fingerprint,
                    f"trajectory {tid!r} of run {run!r}",
                    "set vineppo_allow_stale=True to train on it anyway",
                )
            record = MCRecord.of(node)
            if record is None:
                raise ValueError(f"trajectory {tid!r} of run {run!r} has no MC values: run `vinekv replay` on it first")
            if not args.vineppo_allow_stale:  # the values must come from the policy that sampled the rollout
                check_policy(
                    record.made_by(node.fingerprint),
                    node.fingerprint,
                    f"the MC values of trajectory {tid!r} of run {run!r}",
                    "run `vinekv replay` with the rollout policy, or set vineppo_allow_stale=True",
                )
            if record.mode != args.vineppo_mode:
                raise ValueError(
                    f"trajectory {tid!r} of run {run!r} has {record.mode!r} MC values, the config asks for "
                    f"vineppo_mode={args.vineppo_mode!r}"
                )
            prompt = tuple(store.token_ids(run, tid)[: node.prompt_len])
            index.setdefault(prompt, []).append(tid)
        if not index:
            raise ValueError(f"run {run!r} of {args.vineppo_store} holds no trajectories")
        return index

    def _offline_batch(
        self, state: EasyDeLState, batch: dict[str, jax.Array]
    ) -> tuple[dict[str, jax.Array], dict[str, float | int | str]]:
        args, store, run = self.arguments, self.snapshot_store, self.arguments.vineppo_offline_run
        prompt_ids, prompt_mask = (np.asarray(jax.device_get(batch[k])) for k in ("input_ids", "attention_mask"))
        per_prompt, width = self.num_generations, args.max_completion_length
        rollouts, values, rewards, fields = [], [], [], []
        for group, (ids, mask) in enumerate(zip(prompt_ids, prompt_mask.astype(bool), strict=True)):
            tids = self._offline_index.get(tuple(int(t) for t in ids[mask]), [])
            if len(tids) < per_prompt:
                text = self.processing_class.decode(ids[mask].tolist())
                raise ValueError(
                    f"run {run!r} holds {len(tids)} trajectories with the tokens of prompt {group} of the batch "
                    f"({text!r}), {per_prompt} (num_return_sequences) needed; the run must come from the same "
                    "dataset, tokenizer and chat template"
                )
            for tid in tids[:per_prompt]:
                node = store.trajectory(run, tid)
                response = np.asarray(node.response_token_ids, np.int32)
                if len(response) > width:
                    raise ValueError(
                        f"trajectory {tid!r} of run {run!r} has {len(response)} response tokens, "
                        f"more than max_completion_length={width}"
                    )
                rollouts.append(Rollout(ids[mask].astype(np.int32), response, group, len(rollouts)))
                values.append(MCRecord.of(node))  # present: checked by _index_offline_run
                rewards.append(np.nan if node.reward is None else float(node.reward))
                fields.append(node.task_fields)
        rewards = np.asarray(rewards)
        missing = np.flatnonzero(np.isnan(rewards))
        if missing.size:
            rewards[missing] = self._score_rollouts([rollouts[i] for i in missing], [fields[i] for i in missing])
        completion_ids = np.full((len(rollouts), width), self.padding_value, np.int32)
        completion_mask = np.zeros((len(rollouts), width), np.int32)
        for r in rollouts:
            completion_ids[r.row, : len(r.response_ids)] = r.response_ids
            completion_mask[r.row, : len(r.response_ids)] = 1
        token_adv = self._token_advantages(rollouts, values, rewards, completion_ids.shape)
        out = _prompts_per_row(
            {
                "prompt_ids": jnp.asarray(prompt_ids),
                "prompt_mask": jnp.asarray(prompt_mask),
                "completion_ids": jnp.asarray(completion_ids),
                "completion_mask": jnp.asarray(completion_mask),
            }
        )
        out["advantages"], signal = self._final_advantages(token_adv, completion_mask)
        out["ref_per_token_logps"] = self._completion_logps(self.ref_state, out)
        out["old_per_token_logps"] = self._cut(self._completion_logps(state, out))
        out["num_items_in_batch"] = jnp.sum(out["completion_mask"])
        metrics = {
            "reward_mean": float(rewards.mean()),
            "completion_length": float(completion_mask.sum(1).mean()),
            **_estimation_metrics(values, EstimationStats(), rollouts, rewards),
            **signal,
        }
        return out, metrics

    # -- asynchronous replay ---------------------------------------------------------------------

    def _get_next_batch(self, data_iter: tp.Any, dataloader: tp.Any) -> tuple[tp.Any, tp.Any]:
        """With ``vineppo_async_replay``, training batches are taken one ahead (`_lookahead`): the
        next one is generated while the current one's values are computed."""
        if not self.arguments.vineppo_async_replay or dataloader is not self.dataloader_train:
            return super()._get_next_batch(data_iter, dataloader)
        if self._lookahead is None:
            self._lookahead, data_iter = super()._get_next_batch(data_iter, dataloader)
        batch = self._lookahead
        self._lookahead, data_iter = super()._get_next_batch(data_iter, dataloader)
        return batch, data_iter

    def _async_batch(
        self, state: EasyDeLState, batch: dict[str, jax.Array]
    ) -> tuple[dict[str, jax.Array], dict[str, tp.Any]]:
        """The training batch of this update: ``batch``, generated by the previous call (by the
        policy before the previous update) and valued by the worker meanwhile; before waiting for
        its values, the next batch is generated by the current policy and queued for the worker."""
        if self._pending is None:  # the first update (of this run or after a resume): its batch is not generated yet
            self._generations = batches_done(int(jax.device_get(state.step)), self.arguments.vineppo_ppo_epochs)
            self._pending = self._generate_for_worker(state, batch)
        ahead = self._lookahead if self.data_collator is None else self.data_collator(self._lookahead)
        current, self._pending = self._pending, self._generate_for_worker(state, ahead)
        store, run = self.snapshot_store, current.run
        try:
            start = time.perf_counter()
            report = self._replay_worker.result(run)
            waited = time.perf_counter() - start
            values = stored_values(store, run, current.generated.rollouts)
        finally:  # also when the worker failed: the run is not trained on
            if not self.arguments.vineppo_keep_snapshots and run in store.runs():
                store.delete_run(run)
        current.stats.replay = report
        out, metrics = self._valued(current.generated, values, current.stats)
        metrics["vineppo/replay_seconds"] = waited + current.stats.seconds["capture"] + current.stats.seconds["spill"]
        metrics["vineppo/replay_wait_seconds"] = waited
        metrics["vineppo/worker_replay_seconds"] = sum(report.seconds.values())
        metrics["vineppo/policy_lag"] = (
            int(jax.device_get(state.step)) - current.step
        ) // self.arguments.vineppo_ppo_epochs
        return out, metrics

    def _generate_for_worker(self, state: EasyDeLState, batch: dict[str, jax.Array]) -> _PendingBatch:
        """Generates ``batch`` with ``state``'s policy, spills its rollouts and queues their replay.

        The k-th generated batch is keyed (generation and branches) by step ``k * ppo_epochs``,
        the step at which synchronous training generates its k-th batch."""
        args = self.arguments
        step = self._generations * args.vineppo_ppo_epochs
        self._generations += 1
        keyed = state.replace(step=jnp.asarray(step, dtype=jnp.asarray(state.step).dtype))
        generated = self._rollouts(keyed, batch, self._prompt_fields(batch, True))
        run = self._step_run(step)
        stats = spill_rollouts(
            self.snapshot_store,
            run,
            state.model,
            generated.rollouts,
            generated.fields,
            generated.rewards,
            needs_entropy(generated.config),
            batch_rows=args.vineppo_capture_rows,
            recipe=RolloutRecipe.of(generated.config),
        )
        if self._replay_worker is None:
            self._replay_worker = ReplayWorker(self._worker_setup)
        self._replay_worker.submit(run, state.model, generated.config)
        return _PendingBatch(generated, run, stats, int(jax.device_get(state.step)))

    # -- PPO epochs ------------------------------------------------------------------------------

    def _execute_train_step(self, state, batch) -> tuple[EasyDeLState, LossMetrics, BaseException | None]:
        """Preprocesses (generation, replay, advantages) once, then ``vineppo_ppo_epochs`` updates.

        Each update advances ``state.step``; the step's metrics are the last update's, plus the
        preprocessing metrics, ``vineppo/step_seconds`` (wall time of this call) and
        ``vineppo/replay_time_share`` (replay seconds / step seconds). With
        ``vineppo_async_replay`` the batch comes from `_async_batch` (replay seconds: waiting for
        the worker, plus capture and spill).
        """
        start = time.perf_counter()
        if self.arguments.vineppo_async_replay:
            prepare = lambda: self._async_batch(state, batch)  # noqa: E731
        else:
            prepare = lambda: self._preprocess_batch_input(state=state, batch=batch, is_train=True)  # noqa: E731
        epochs = epochs_this_batch(self, state, self.arguments.vineppo_ppo_epochs)
        state, metrics, informations, error = run_ppo_epochs(self, state, prepare, epochs)
        if error is not None:
            return state, metrics, error
        replay_s = informations.get("vineppo/replay_seconds", 0.0)
        informations["vineppo/step_seconds"] = time.perf_counter() - start
        informations["vineppo/replay_time_share"] = replay_s / max(informations["vineppo/step_seconds"], 1e-9)
        informations["vineppo/ppo_epochs"] = epochs
        if metrics.other_metrics is not None:
            informations.update(metrics.other_metrics)
        entry = {"step": int(jax.device_get(state.step)), "loss": float(metrics.loss), **_floats(informations)}
        for callback in self.step_callbacks:
            extra = _floats(callback(state, entry) or {})
            entry.update(extra)
            informations.update(extra)
        self.history.append(entry)
        _log_batch(self.history[-1])
        self._advance_bar(self.history[-1])
        return state, metrics.replace(other_metrics=informations), None


def batches_done(step: int, epochs: int) -> int:
    """Batches a run at optimizer step ``step`` has trained on, ``epochs`` updates per batch (the
    last batch of a run stopped at ``max_training_steps`` may have had fewer)."""
    return -(-step // epochs)


def epochs_this_batch(trainer: tp.Any, state: EasyDeLState, epochs: int) -> int:
    """``epochs`` updates on the next batch, or fewer so that the run makes exactly
    ``max_training_steps`` updates (``--steps 3`` with 2 epochs: batches of 2 and 1)."""
    limit = trainer.max_training_steps
    left = epochs if limit is None else limit - int(jax.device_get(state.step))
    return max(1, min(epochs, left))


def run_ppo_epochs(
    trainer: tp.Any, state: EasyDeLState, prepare: tp.Callable[[], tuple[dict, dict]], epochs: int
) -> tuple[EasyDeLState, LossMetrics, dict, BaseException | None]:
    """``prepare()`` (the training batch and its metrics) once, then ``epochs`` updates of
    ``trainer``'s jitted step on it: ``(state, last update's metrics, batch metrics, error)``;
    the batch metrics gain ``update_seconds`` (wall time of the updates).
    Interruptions and out-of-memory errors are returned, as EasyDeL's own step returns them
    (annotated, so the trainer saves and stops); other errors raise."""
    metrics, informations = LossMetrics(), {}
    try:
        batch, informations = prepare()
        start = time.perf_counter()
        for _ in range(epochs):
            state, metrics = jax.block_until_ready(
                trainer.sharded_training_step_function(
                    state, batch, *trainer._train_shared_fn_extra_args, *trainer._train_shared_fn_static_args
                )
            )
        informations["update_seconds"] = time.perf_counter() - start
    except (KeyboardInterrupt, EasyDeLTimerError, EasyDeLBreakRequest) as run_exception:
        return state, metrics, informations, run_exception
    except Exception as run_exception:
        if trainer._is_memory_oom_exception(run_exception):
            return state, metrics, informations, trainer._augment_memory_oom_exception(run_exception)
        raise
    return state, metrics, informations, None


@dataclasses.dataclass
class _GeneratedBatch:
    """A generated training batch before its MC values: GRPO's ``out`` (prompts one row per
    completion, with the rollout policy's ``old_per_token_logps``), its metrics, the rollouts,
    their task fields and returns, and the replay settings (seeded) of their branches."""

    out: dict[str, jax.Array]
    metrics: dict[str, tp.Any]
    completion_mask: np.ndarray
    rollouts: list[Rollout]
    fields: list[dict[str, tp.Any]]
    rewards: np.ndarray
    config: ReplayConfig
    generated_kv: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class _PendingBatch:
    """A generated batch whose values the replay worker computes from store run ``run``;
    ``step``: the trainer's step when it was generated."""

    generated: _GeneratedBatch
    run: str
    stats: EstimationStats
    step: int


def resumed_into(resumed: EasyDeLState, model: EasyDeLBaseModule) -> EasyDeLState:
    """``resumed``'s parameters, optimizer state and step in ``model``'s module definition.

    EasyDeL rebuilds a resumed model from the checkpoint's config.json, which does not keep
    runtime settings of the model the trainer was given (``attn_dtype``, a float32 RoPE table):
    a float32 policy would resume with bfloat16 attention (logits off by ~4e-3 here).
    """
    fresh = model.to_state()
    return resumed.replace(graphdef=fresh.graphdef, graphother=fresh.graphother)


def rollout_stop_ids(mask_eos_ids: tp.Any, generation_kwargs: dict[str, tp.Any] | None) -> frozenset[int]:
    """Where a rollout ends: the EOS ids GRPO cuts ``completion_mask`` at (``_eos_token_id``:
    tokenizer and generation-config EOS) and any ``eos_token_id`` given in the generation
    kwargs (the compiled ``generate`` stops there too)."""
    extra = (generation_kwargs or {}).get("eos_token_id")
    ids = list(np.atleast_1d(mask_eos_ids)) + ([] if extra is None else list(np.atleast_1d(extra)))
    return frozenset(int(i) for i in ids if i is not None)


def _is_python_reward(fn: tp.Any) -> bool:
    """A reward function vinekv can call (not an EasyDeL reward model)."""
    return callable(fn) and not isinstance(fn, EasyDeLState | EasyDeLBaseModule)


def _prompts_per_row(out: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The batch with one prompt row per completion row.

    GRPO keeps one row per prompt and repeats it inside the loss, but gradient accumulation
    slices only the arrays with the completions' row count, which would pair completions with
    other prompts; with every array row-aligned, slicing is consistent.
    """
    factor = out["completion_ids"].shape[0] // out["prompt_ids"].shape[0]
    if factor == 1:
        return out
    return {
        **out,
        "prompt_ids": out["prompt_ids"].repeat(factor, 0),
        "prompt_mask": out["prompt_mask"].repeat(factor, 0),
    }


def _estimation_metrics(
    values: list[MCRecord], stats: EstimationStats, rollouts: list[Rollout], rewards: np.ndarray
) -> dict[str, float]:
    """Step metrics: MC value mean/variance, branch counts and budget, store bytes, replay seconds.

    ``vineppo/states`` counts every rollout's valued states, ``vineppo/sampled_states`` the
    distinct ones branches were sampled for, ``vineppo/branches`` the branches sampled and
    ``vineppo/branches_saved`` the share of branches valuing each rollout alone would have added."""
    all_stats = [v.stats for v in values]
    counts = np.concatenate([s.count for s in all_stats]) if values else np.zeros(0, np.int64)
    valued = counts > 0
    means = np.concatenate([s.mean for s in all_stats])[valued] if values else np.zeros(0)
    variances = np.concatenate([s.var for s in all_stats])[valued] if values else np.zeros(0)
    rollout_tokens = sum(len(r.response_ids) for r in rollouts)
    report = stats.replay
    return {
        "vineppo/mc_value_mean": float(np.mean(means)) if means.size else 0.0,
        "vineppo/mc_value_var": float(np.mean(variances)) if variances.size else 0.0,
        "vineppo/states": float(valued.sum()),
        "vineppo/branches_per_state": float(counts[valued].mean()) if valued.any() else 0.0,
        "vineppo/branches_per_state_max": float(counts.max()) if counts.size else 0.0,
        "vineppo/sampled_states": float(report.sampled_states),
        "vineppo/branches": float(report.branches),
        "vineppo/branches_saved": 1.0 - report.branches / report.separate_branches if report.separate_branches else 0.0,
        "vineppo/branch_tokens": float(report.branch_tokens),
        "vineppo/budget_branch_tokens_per_rollout_token": report.branch_tokens / max(rollout_tokens, 1),
        "vineppo/branch_tokens_per_second": report.tokens_per_second,
        "vineppo/store_bytes": float(stats.store_bytes),
        "vineppo/peak_kv_bytes": float(stats.peak_kv_bytes),
        "vineppo/kv_from_generation": float(stats.kv_from_generation) / max(len(rollouts), 1),
        "vineppo/capture_seconds": stats.seconds["capture"] + stats.seconds["spill"],
        **{f"vineppo/seconds/{name}": stats.seconds[name] for name in ("capture", "spill")},
        **{f"vineppo/seconds/{name}": seconds for name, seconds in report.seconds.items()},  # read, decode, score
        "vineppo/replay_seconds": stats.seconds["replay"] + stats.seconds["capture"] + stats.seconds["spill"],
        "vineppo/trajectory_reward_mean": float(np.mean(rewards)) if len(rewards) else 0.0,
    }


def _log_batch(entry: dict[str, float]) -> None:
    if "vineppo/states" not in entry:
        return
    logger.info(
        "step %d: reward %.3f, MC value %.3f (var %.4f), %d states, %d branches (%.1f tokens per rollout token), "
        "replay %.0f%% of the step",
        entry["step"],
        entry["vineppo/trajectory_reward_mean"],
        entry["vineppo/mc_value_mean"],
        entry["vineppo/mc_value_var"],
        entry["vineppo/states"],
        entry["vineppo/branches"],
        entry["vineppo/budget_branch_tokens_per_rollout_token"],
        100 * entry["vineppo/replay_time_share"],
    )


def _floats(metrics: dict[str, tp.Any]) -> dict[str, float]:
    """The entries of ``metrics`` that are numbers, as floats."""
    out = {}
    for name, value in metrics.items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out
