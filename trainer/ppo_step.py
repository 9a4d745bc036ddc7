"""`ppo_step`: EasyDeL's GRPO training step with a pluggable per-token loss.

Why: EasyDeL 0.3.0's ``grpo_step``
(``easydel/trainers/group_relative_policy_optimization/_fn.py``, lines 707-718, and the chunked
copy at 551-560) clips the wrong side for negative advantages: ``-max(r*A, clip(r)*A)`` where PPO
has ``-min(r*A, clip(r)*A)`` (see `trainer.losses`). Stock GRPO never notices (it has no
``old_per_token_logps``, so ``r == 1``), but VinePPO does: it supplies the rollout policy's
log-probs and runs several PPO epochs. The loss sits in a closure of ``grpo_step``, so it cannot
be patched from outside; this module re-states the step with the per-token loss as an argument.

`ppo_step` takes ``grpo_step``'s arguments in the same order (17 statics, positions 2-18) plus a
static ``token_loss_fn`` (position 19, default `ppo_token_loss`) and otherwise does what
``grpo_step`` does: batch sharding constraint and minibatch-size checks, straight-through
emulator, prompt repeat by ``completion_rows // prompt_rows``, multimodal model kwargs, the
``max_loss_completion_tokens`` cut, row-chunked or entropy-returning log-probs, token or sequence
importance sampling, top-entropy mask, ``+ beta * k3 KL`` per token, the ``grpo`` / ``bnpo`` /
``dr_grpo`` / ``dapo`` aggregation, the same metrics, ``minibatch_call`` gradient accumulation
and the NaN-guarded update. Differences from ``grpo_step``:

- per-token advantages and ``old_per_token_logps`` are cut to the loss width (``grpo_step``
  cuts the completions but re-reads the uncut arrays);
- ``dr_grpo`` divides by rows * completion width even when the per-token loss is ``[N, 1]``
  (sequence-level weights with sequence advantages and ``beta == 0``);
- the row-chunked path (``completion_chunk_size``) concatenates the chunks' log-probs and
  computes loss and metrics once, so its ``ref_per_token_logps`` metric is the unmasked mean of
  the non-chunked path;
- ``delta`` and ``loss_type='cispo'`` are refused (``ValueError`` at trace time);
- more metrics, to see an update's size: ``mean_entropy`` (policy entropy per response token,
  nats; whenever the log-probs are not row-chunked), ``policy_kl`` (KL(old || new) per token,
  k3 estimator), ``ratio/mean``, ``ratio/max``, ``ratio/min`` over response tokens.
"""

from __future__ import annotations

import collections.abc
import typing as tp

import jax
import jax.numpy as jnp
from easydel.infra.base_state import EasyDeLState
from easydel.infra.loss_utils import LossConfig, LossMetrics
from easydel.trainers.group_relative_policy_optimization._fn import (
    get_per_token_logps,
    get_per_token_logps_and_entropies,
)
from easydel.trainers.training_utils import (
    extract_generation_model_kwargs,
    make_assertions_and_get_sizes,
    minibatch_call,
    repeat_prompt_aligned_model_kwargs,
    slice_prompt_aligned_model_kwargs,
    update_metrics,
    update_state_respectfully,
)
from eformer.escale import with_sharding_constraint
from jax.sharding import PartitionSpec

from vinekv.trainer.losses import ppo_token_loss

TokenLossFn = tp.Callable[[jax.Array, jax.Array, jax.Array, float, float], jax.Array]
"""``(logps, old_logps, advantages, clip_low, clip_high) -> [B, T]`` per-token loss to minimise."""

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STATIC_ARGNUMS = tuple(range(2, 20))  # grpo_step's statics (2-18) + token_loss_fn (19)


def ppo_step(
    state: EasyDeLState,
    batch: collections.abc.Mapping[str, jax.Array],
    num_generations: int,
    beta: float,
    loss_config: LossConfig | None = None,
    learning_rate_fn: tp.Callable | None = None,
    partition_spec: PartitionSpec | None = None,
    gradient_accumulation_steps: int = 1,
    is_training: bool = True,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    importance_sampling_level: str = "token",
    top_entropy_quantile: float = 1.0,
    completion_chunk_size: int | None = None,
    max_loss_completion_tokens: int | None = None,
    logprob_vocab_chunk_size: int | None = None,
    straight_through_emulator: tp.Callable[[tp.Any], tp.Any] | None = None,
    token_loss_fn: TokenLossFn = ppo_token_loss,
) -> tuple[EasyDeLState, LossMetrics] | LossMetrics:
    """One training (``(state, metrics)``) or evaluation (``metrics``) step; see the module docstring.

    ``batch``: ``prompt_ids`` / ``prompt_mask`` ``[P, Lp]``, ``completion_ids`` / ``completion_mask``
    ``[N, Lc]`` (N a multiple of P), ``advantages`` ``[N]`` or ``[N, Lc]``, optional
    ``old_per_token_logps`` / ``ref_per_token_logps`` ``[N, Lc]`` and ``num_items_in_batch``.
    ``num_generations`` is unused (the row ratio is), as in ``grpo_step``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"ppo_step supports loss_type in {LOSS_TYPES}, got {loss_type!r} (cispo is not implemented)")
    if delta is not None:
        raise ValueError(f"ppo_step does not implement delta (two-sided clipping), got delta={delta!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")

    _, minibatch_size, partition_spec = make_assertions_and_get_sizes(
        batch=batch,
        gradient_accumulation_steps=gradient_accumulation_steps,
        batch_partition_spec=partition_spec,
    )
    batch = with_sharding_constraint(arr=batch, sharding=partition_spec)

    def loss_fn(tree, minibatch):
        if is_training and straight_through_emulator is not None:
            tree = straight_through_emulator(tree)
        module = state.merge(tree)

        prompt_ids, prompt_mask = minibatch["prompt_ids"], minibatch["prompt_mask"]
        completion_ids, completion_mask = minibatch["completion_ids"], minibatch["completion_mask"]
        truncated = max_loss_completion_tokens is not None and completion_ids.shape[1] > max_loss_completion_tokens
        if truncated:
            completion_ids = completion_ids[:, :max_loss_completion_tokens]
            completion_mask = completion_mask[:, :max_loss_completion_tokens]
        rows, width = completion_ids.shape

        generations = max(rows // max(prompt_ids.shape[0], 1), 1)
        input_ids = jnp.concatenate([prompt_ids.repeat(generations, 0), completion_ids], axis=1)
        attention_mask = jnp.concatenate([prompt_mask.repeat(generations, 0), completion_mask], axis=1)
        model_kwargs = repeat_prompt_aligned_model_kwargs(
            extract_generation_model_kwargs(minibatch, model_callable=module.__call__),
            generations,
            prompt_batch_size=prompt_ids.shape[0],
        )
        logps, entropies = _token_logps(
            module,
            input_ids,
            attention_mask,
            prompt_ids.shape[-1],
            model_kwargs,
            with_entropies=top_entropy_quantile < 1.0 or completion_chunk_size is None,
            chunk_rows=completion_chunk_size,
            vocab_chunk=logprob_vocab_chunk_size,
        )

        advantages = minibatch["advantages"]
        advantages = advantages[:, None] if advantages.ndim == 1 else advantages[:, :width]
        old = minibatch.get("old_per_token_logps")
        old = jax.lax.stop_gradient(logps) if old is None else old[:, :width]

        if importance_sampling_level == "token":
            log_w, old_w = logps, old
        else:  # GSPO: mean log-ratio over the sequence's tokens, [N, 1]
            log_ratio = ((logps - old) * completion_mask).sum(-1, keepdims=True)
            log_w = log_ratio / jnp.maximum(completion_mask.sum(-1, keepdims=True), 1.0)
            old_w = jnp.zeros_like(log_w)
        per_token_loss = token_loss_fn(log_w, old_w, advantages, epsilon, epsilon_high)
        ratio = jnp.exp(log_w - old_w)

        if entropies is not None and top_entropy_quantile < 1.0:
            masked = jnp.where(completion_mask > 0, entropies, jnp.nan)
            threshold = jnp.nanquantile(masked, 1 - top_entropy_quantile)
            per_token_loss = per_token_loss * (entropies >= threshold).astype(completion_mask.dtype) * completion_mask

        if beta != 0.0:
            ref = minibatch["ref_per_token_logps"][:, :width]
            per_token_kl = jnp.exp(ref - logps) - (ref - logps) - 1  # k3 estimator of KL(pi || ref)
            per_token_loss = per_token_loss + beta * per_token_kl

        token_count = jnp.sum(completion_mask)
        masked_loss = per_token_loss * completion_mask
        if loss_type == "grpo":
            loss = jnp.mean(jnp.sum(masked_loss, 1) / jnp.maximum(jnp.sum(completion_mask, 1), 1.0))
        elif loss_type == "bnpo":
            loss = jnp.sum(masked_loss) / jnp.maximum(token_count, 1.0)
        elif loss_type == "dr_grpo":
            loss = jnp.sum(masked_loss) / (rows * width)
        else:  # dapo: global token count of the whole batch, unless the completions were cut
            normalizer = token_count if truncated else minibatch.get("num_items_in_batch", token_count)
            loss = jnp.sum(masked_loss) / jnp.maximum(normalizer, 1.0)

        def masked_mean(x: jax.Array) -> jax.Array:
            return jnp.mean(x) if x.shape[1] == 1 else jnp.sum(x * completion_mask) / jnp.maximum(token_count, 1.0)

        low = (ratio < 1 - epsilon) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        log_ratio = jax.lax.stop_gradient(log_w - old_w)
        real = completion_mask > 0 if log_ratio.shape[1] > 1 else jnp.ones_like(log_ratio, bool)
        metrics = {
            "mean_entropy": masked_mean(jax.lax.stop_gradient(entropies))
            if entropies is not None
            else jnp.array(jnp.nan, logps.dtype),
            "advantages": jnp.mean(advantages),
            "clip_ratio/low_mean": masked_mean(low.astype(jnp.float32)),
            "clip_ratio/high_mean": masked_mean(high.astype(jnp.float32)),
            "clip_ratio/region_mean": masked_mean((low | high).astype(jnp.float32)),
            # KL(old || new) per token, k3 estimator on the old policy's samples (Schulman 2020)
            "policy_kl": masked_mean(jnp.expm1(log_ratio) - log_ratio),
            "ratio/mean": masked_mean(jnp.exp(log_ratio)),
            "ratio/max": jnp.max(jnp.where(real, jnp.exp(log_ratio), 0.0)),
            "ratio/min": jnp.min(jnp.where(real, jnp.exp(log_ratio), jnp.inf)),
        }
        if beta != 0.0:
            metrics["mean_kl"] = masked_mean(per_token_kl)
            metrics["ref_per_token_logps"] = jnp.mean(ref)
        return loss, LossMetrics(loss=loss, accuracy=1, other_metrics=metrics)

    if not is_training:
        _, metrics = loss_fn(tree=state.graphstate, minibatch=batch)
        return metrics
    gradients, metrics = minibatch_call(
        state=state,
        batch=batch,
        minibatch_size=minibatch_size,
        grad_fn=jax.value_and_grad(loss_fn, has_aux=True),
    )
    metrics = update_metrics(metrics=metrics, learning_rate_fn=learning_rate_fn, step=state.step, gradients=gradients)
    state = update_state_respectfully(state=state, gradients=gradients, loss_config=loss_config, metrics=metrics)
    return state, metrics


def _token_logps(
    module: tp.Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    prompt_len: int,
    model_kwargs: dict[str, tp.Any],
    *,
    with_entropies: bool,
    chunk_rows: int | None,
    vocab_chunk: int | None,
) -> tuple[jax.Array, jax.Array | None]:
    """Completion log-probs ``[N, Lc]`` (and entropies when asked), in row chunks when ``chunk_rows``
    is smaller than N and no entropies are needed, as ``grpo_step`` chooses."""
    if with_entropies:
        return get_per_token_logps_and_entropies(
            module,
            input_ids,
            attention_mask,
            prompt_len,
            model_kwargs=model_kwargs,
            logprob_vocab_chunk_size=vocab_chunk,
        )
    rows = input_ids.shape[0]
    step = rows if chunk_rows is None else chunk_rows
    parts = [
        get_per_token_logps(
            module,
            input_ids[lo : lo + step],
            attention_mask[lo : lo + step],
            prompt_len,
            model_kwargs=model_kwargs
            if step >= rows
            else slice_prompt_aligned_model_kwargs(model_kwargs, lo, min(lo + step, rows), prompt_batch_size=rows),
            logprob_vocab_chunk_size=vocab_chunk,
        )
        for lo in range(0, rows, step)
    ]
    return (parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)), None
