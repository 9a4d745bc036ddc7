"""Supervised warm-up of a tiny policy on the arithmetic task, cached on disk, and its accuracy.

RL credit assignment matters where a policy is partly right: `warm_up` trains a tiny EasyDeL
Llama on reference solutions (cross-entropy on response tokens, AdamW with linear warm-up and
gradient clipping) for a fixed number of steps, so that its sampled held-out accuracy lands
well inside (0, 1). The result is cached under ``.vinekv_cache/`` of the project (or
``$VINEKV_CACHE``), keyed by a digest of the `WarmupConfig`: the first run trains (minutes on
2 cores), later runs load. This warmed-up model is also the "trained model" whose KV the store
and codec benchmarks use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from vinekv.models import ModelShape, build_model
from vinekv.tasks.arithmetic import build_task_tokenizer, make_dataset, reward, vocab_size

CACHE_ENV = "VINEKV_CACHE"
TASK_SHAPE = ModelShape(
    vocab_size=vocab_size(),
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


@dataclasses.dataclass(frozen=True)
class WarmupConfig:
    """Settings of the warm-up (every field is part of the cache key).

    Attributes:
      steps: optimizer steps (~900 leave sampled accuracy around 0.3-0.4 on 2-4 operations).
      batch_size: problems per step.
      learning_rate: AdamW peak learning rate, reached after ``warmup_steps`` linear steps.
      warmup_steps: linear warm-up steps of the learning rate.
      clip_norm: global gradient-norm clip.
      train_problems: size of the training set (problems drawn with seed ``seed``).
      task_steps: range of operations per problem (inclusive).
      operand_max: operands are drawn from ``[0, operand_max]``.
      seed: seed of the problems, the initialisation and the batch order.
      shape: the model's shape (a tiny Llama).
    """

    steps: int = 900
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    clip_norm: float = 1.0
    train_problems: int = 20_000
    task_steps: tuple[int, int] = (2, 4)
    operand_max: int = 9
    seed: int = 0
    shape: ModelShape = TASK_SHAPE

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_steps", tuple(self.task_steps))  # a TOML file gives a list
        errors = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("steps", "batch_size", "train_problems")
            if getattr(self, name) < 1
        ]
        if self.learning_rate <= 0 or self.clip_norm <= 0 or self.warmup_steps < 0:
            errors.append("learning_rate and clip_norm must be > 0 and warmup_steps >= 0")
        if errors:
            raise ValueError("invalid WarmupConfig: " + "; ".join(errors))

    def digest(self) -> str:
        return hashlib.blake2b(json.dumps(dataclasses.asdict(self), sort_keys=True).encode(), digest_size=6).hexdigest()


@dataclasses.dataclass(frozen=True)
class WarmupResult:
    """A warmed-up policy: ``model``, its ``tokenizer`` (saved in ``path``), where it is cached,
    whether it was loaded from the cache, the training seconds and the final training loss."""

    model: Any
    tokenizer: Any
    path: Path
    cached: bool
    seconds: float
    final_loss: float


def cache_root() -> Path:
    """``$VINEKV_CACHE``, else ``.vinekv_cache`` in the project root."""
    return Path(os.environ.get(CACHE_ENV) or Path(__file__).resolve().parents[2] / ".vinekv_cache")


def build_task_model(shape: ModelShape = TASK_SHAPE, seed: int = 0) -> Any:
    """A randomly initialised tiny Llama for the task tokenizer, with a generation config."""
    from transformers import GenerationConfig

    model = build_model("llama", shape, seed=seed, eos_token_id=1, pad_token_id=0)
    model.generation_config = GenerationConfig(eos_token_id=1, pad_token_id=0, do_sample=True)
    return model


def encode_examples(tokenizer: Any, prompts: list[str], solutions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [N, W], loss_mask [N, W])``: prompt + solution + EOS right-padded to the longest;
    the mask is 1 on solution and EOS tokens."""
    rows, masks = [], []
    for prompt, solution in zip(prompts, solutions, strict=True):
        p = tokenizer.encode(prompt, add_special_tokens=False)
        r = tokenizer.encode(solution, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    width = max(map(len, rows))
    ids = np.full((len(rows), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(row)], mask[i, : len(m)] = row, m
    return ids, mask


def _train(model: Any, tokenizer: Any, config: WarmupConfig, progress: bool) -> float:
    import optax
    from flax import nnx

    data = make_dataset(config.train_problems, config.seed, config.task_steps, config.operand_max)
    ids, mask = encode_examples(tokenizer, data["prompt"], data["solution"])
    schedule = optax.linear_schedule(0.0, config.learning_rate, max(1, config.warmup_steps))
    optimizer = optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adamw(schedule, weight_decay=0.0))
    graphdef, params, rest = model.split_module()
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch_ids, batch_mask):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(input_ids=batch_ids).logits[:, :-1].astype(jnp.float32)
            logp = jnp.take_along_axis(jax.nn.log_softmax(logits), batch_ids[:, 1:, None], axis=-1)[..., 0]
            weight = batch_mask[:, 1:]
            return -(logp * weight).sum() / jnp.maximum(weight.sum(), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(config.seed)
    loss = float("nan")
    with model.mesh, tqdm(total=config.steps, desc="warm-up", unit="step", disable=not progress) as bar:
        for i in range(config.steps):
            rows = rng.integers(0, len(ids), config.batch_size)
            width = int(np.flatnonzero(mask[rows].any(0)).max()) + 1
            params, opt_state, loss_value = step(params, opt_state, ids[rows, :width], mask[rows, :width])
            if i % 25 == 0 or i == config.steps - 1:
                loss = float(loss_value)
                bar.set_postfix(loss=f"{loss:.3f}")
            bar.update(1)
    nnx.update(model, params)
    return loss


def _leaves(model: Any) -> tuple[list[str], list[Any], Any]:
    from flax import nnx

    params = nnx.state(model, nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return [jax.tree_util.keystr(path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def save_params(model: Any, path: Path) -> None:
    """The model's parameters as ``params.npz`` (one array per parameter path)."""
    names, leaves, _ = _leaves(model)
    np.savez(
        path / "params.npz",
        **{name: np.asarray(jax.device_get(leaf)) for name, leaf in zip(names, leaves, strict=True)},
    )


def load_params(model: Any, path: Path) -> Any:
    """Writes ``params.npz`` into ``model``; raises naming the parameters that do not match."""
    from flax import nnx

    names, leaves, treedef = _leaves(model)
    with np.load(path / "params.npz") as stored:
        missing = sorted(set(names) ^ set(stored.files))
        bad = [n for n, leaf in zip(names, leaves, strict=True) if n in stored.files and stored[n].shape != leaf.shape]
        if missing or bad:
            raise ValueError(f"{path / 'params.npz'} does not fit the model: names {missing[:5]}, shapes {bad[:5]}")
        arrays = [jnp.asarray(stored[n], dtype=leaf.dtype) for n, leaf in zip(names, leaves, strict=True)]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, arrays))
    return model


def warm_up(config: WarmupConfig = WarmupConfig(), *, cache: Path | None = None, progress: bool = True) -> WarmupResult:
    """The warmed-up policy for ``config``: loaded from the cache, or trained and cached.

    The cache entry (``<cache>/arithmetic-<digest>/``: ``params.npz``, the tokenizer,
    ``warmup.json``) appears atomically: a killed warm-up leaves nothing half-written.
    """
    path = (cache or cache_root()) / f"arithmetic-{config.digest()}"
    model = build_task_model(config.shape, config.seed)
    if (path / "warmup.json").exists():
        info = json.loads((path / "warmup.json").read_text())
        load_params(model, path)
        tokenizer = build_task_tokenizer()
        return WarmupResult(model, tokenizer, path, True, info["seconds"], info["final_loss"])
    tokenizer = build_task_tokenizer()
    start = time.perf_counter()
    final_loss = _train(model, tokenizer, config, progress)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        save_params(model, staging)
        tokenizer.save_pretrained(str(staging / "tokenizer"))
        info = {"config": dataclasses.asdict(config), "seconds": seconds, "final_loss": final_loss}
        (staging / "warmup.json").write_text(json.dumps(info, indent=2) + "\n")
        staging.rename(path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (path / "warmup.json").exists():  # not a concurrent warm-up that finished first
            raise
    return WarmupResult(model, tokenizer, path, False, seconds, final_loss)


def accuracy(model: Any, tokenizer: Any, dataset: Any, **options: Any) -> float:
    """Share of ``dataset`` (``prompt``/``answer`` columns) the policy solves (`solved`'s mean)."""
    return float(solved(model, tokenizer, dataset, **options).mean())


def solved(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 256,
    grade: Callable[..., list[float]] = reward,
) -> np.ndarray:
    """``[N]`` grades of the policy on each problem of ``dataset`` (``prompt``/``answer`` columns):
    greedy (``temperature=0``) or sampled completions of up to ``max_new_tokens``, cut at the
    first stop token (`vinekv.replay.sampler.eos_token_ids`), graded by
    ``grade(prompts, completions, answer)`` (default: the arithmetic verifier, 0 or 1)."""
    from vinekv.replay.decode import decode, prefill, row_keys_for
    from vinekv.replay.sampler import eos_token_ids

    prompts, answers = list(dataset["prompt"]), list(dataset["answer"])
    stops = np.fromiter(eos_token_ids(model, tokenizer), np.int64)
    grades = []
    for lo in range(0, len(prompts), batch_size):
        chunk = prompts[lo : lo + batch_size]
        encoded = [tokenizer.encode(p, add_special_tokens=False) for p in chunk]
        lens = np.array([len(e) for e in encoded])
        ids = np.full((len(chunk), lens.max()), tokenizer.pad_token_id, np.int32)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = e
        cache, logits = prefill(model, ids, lens, max_length=int(lens.max()) + max_new_tokens)
        keys = row_keys_for(seed + lo, len(chunk))
        tokens = decode(model, cache, logits, max_new_tokens, temperature=temperature, row_keys=keys).tokens
        texts = [tokenizer.decode(_until_stop(row, stops), skip_special_tokens=True) for row in tokens]
        grades.extend(grade(chunk, texts, answers[lo : lo + batch_size]))
    return np.asarray(grades, dtype=np.float64)


def _until_stop(tokens: np.ndarray, stops: np.ndarray) -> list[int]:
    hits = np.flatnonzero(np.isin(tokens, stops))
    return tokens[: hits[0]].tolist() if hits.size else tokens.tolist()
