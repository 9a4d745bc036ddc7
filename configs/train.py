"""Configuration of the VinePPO training job (`vinekv train`): the built-in arithmetic task, or
GSM8K-format data on a local Hugging Face model (`configs/qwen2.5-*-gsm8k.toml`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vinekv.trainer.field_types import check_fields, check_instance

# Trainer settings of the built-in job (docs/benchmarks.md, "A regime that learns"): batches of 32
# problems x 4 responses (128 rollouts; 8 x 4 did not learn), 2 PPO epochs per batch, AdamW at
# 1e-4 after a 20-update linear warm-up (Adam's first updates are sign-like: full-size steps in
# noisy directions), gradients clipped at 1; full VinePPO with K = 4 branches per step start within
# each rollout's remaining 40-token budget, advantages whitened, PPO's token-mean loss, snapshots
# spilled to the store. 60 updates: the demo's size (docs/benchmarks.md, "make demo").
DEFAULT_TRAINER: dict[str, Any] = {
    "vineppo_mode": "full",
    "vineppo_cache_strategy": "disk",
    "vineppo_codec": "int8",
    "vineppo_branches": 4,
    "vineppo_ppo_epochs": 2,
    "vineppo_whiten_advantages": True,
    "vineppo_keep_snapshots": True,
    "max_training_steps": 60,
    "total_batch_size": 32,
    "num_return_sequences": 4,
    "max_prompt_length": 32,
    "max_completion_length": 40,
    "learning_rate": 1e-4,
    "scheduler": "linear",
    "warmup_steps": 20,
    "learning_rate_end": 1e-4,
    "clip_grad": 1.0,
    "beta": 0.0,
    "loss_type": "bnpo",
}


def job_trainer(overrides: dict[str, Any]) -> dict[str, Any]:
    """`DEFAULT_TRAINER` with ``overrides`` on top. Unless ``overrides`` sets ``warmup_steps``, the
    learning-rate warm-up is at most a third of ``max_training_steps`` (EasyDeL refuses a warm-up
    as long as the run), so a short run such as ``--steps 4`` keeps the regime's shape."""
    settings = {**DEFAULT_TRAINER, **overrides}
    if "warmup_steps" not in overrides and settings.get("warmup_steps"):
        settings["warmup_steps"] = min(settings["warmup_steps"], settings["max_training_steps"] // 3)
    return settings


CHECKPOINT_MODEL_NAME = "policy"  # checkpoints go to <output>/checkpoints/policy/run-<step>


def job_settings(output: Path, seed: int, checkpoints: bool = False, resume: bool = False) -> dict:
    """Trainer settings of a local job writing under ``output``: no wandb, compiled generation,
    the store in ``output/kv``, one log line per step; with ``checkpoints`` the final policy is
    saved under ``output/checkpoints``, with ``resume`` training continues from the latest one."""
    return {
        "save_directory": str(output / "checkpoints"),
        "model_name": CHECKPOINT_MODEL_NAME,
        "do_last_save": checkpoints,
        "resume_if_possible": resume,
        "use_esurge_generation": False,
        "use_wandb": False,
        "do_eval": False,
        "shuffle_train_dataset": False,
        "progress_bar_type": "json",
        "track_memory": False,
        "report_steps": 1,
        "log_steps": 1,
        "generation_seed": seed,
        "vineppo_store": str(output / "kv"),
    }


TASKS = ("arithmetic", "gsm8k")
DTYPES = ("bfloat16", "float32", "float16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """VinePPO end to end: on the arithmetic task from the cached supervised warm-up (default),
    or on GSM8K-format JSONL with a model from a local folder.

    Attributes:
      task: ``arithmetic`` (built-in problems, the warm-up policy) or ``gsm8k`` (needs ``model``,
        ``train_data`` and ``eval_data`` on disk).
      model: gsm8k: a local Hugging Face model folder (`vinekv.models.load_model`).
      dtype: gsm8k: compute, parameter and KV dtype of the model.
      sharding_axis_dims: gsm8k: mesh sizes of EasyDeL's ``(dp, fsdp, ep, tp, sp)`` axes (empty:
        every device on fsdp).
      train_data, eval_data: gsm8k: JSONL files (`vinekv.tasks.gsm8k.load_jsonl`).
      prompt_template: gsm8k: a prompt from a question (``{question}``).
      chat_template: gsm8k: wrap each prompt as a user message in the tokenizer's chat template
        (when it has one).
      eval_max_tokens, eval_batch_size: budget and batch of the held-out accuracy's completions.
      seed: seeds the training problems and (through ``generation_seed``) the sampling keys.
      warmup: `vinekv.tasks.warmup.WarmupConfig` fields over its defaults (the policy to start
        from; cached after its first run).
      train_problems: problems the trainer draws its batches from (seed ``seed + 1``).
      eval_problems: held-out problems for the accuracy before and after (seed ``eval_seed``).
      eval_seed: seed of the held-out problems.
      eval_every: held-out greedy accuracy every this many updates during training (0: only
        before and after); it joins the step's metrics, the plot and ``metrics.jsonl``.
      output: folder of the job's store (``kv/``), checkpoints, ``metrics.jsonl`` (one JSON line
        of metrics per step, appended across ``resume``) and plot.
      plot: write ``<output>/vinekv-train.png`` of the per-step metrics.
      checkpoints: save the policy (and optimizer state) under ``<output>/checkpoints`` at the
        end, and every ``trainer.save_steps`` updates when that is set.
      resume: continue from the newest checkpoint under ``<output>/checkpoints`` (same problems
        and sampling keys as an uninterrupted run); without it, an output that already holds a
        checkpoint is refused.
      trainer: `VinePPOConfig` fields (EasyDeL's GRPOConfig fields too), over `DEFAULT_TRAINER`
        (`job_trainer`).
    """

    task: str = "arithmetic"
    model: str = ""
    dtype: str = "bfloat16"
    sharding_axis_dims: tuple[int, ...] = ()
    train_data: str = ""
    eval_data: str = ""
    prompt_template: str = "{question}"
    chat_template: bool = True
    eval_max_tokens: int = 48
    eval_batch_size: int = 256
    seed: int = 0
    warmup: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_problems: int = 2000
    eval_problems: int = 400
    eval_seed: int = 12345
    eval_every: int = 10
    output: str = "runs/train"
    plot: bool = True
    checkpoints: bool = True
    resume: bool = False
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from vinekv.tasks.warmup import WarmupConfig
        from vinekv.trainer.vineppo_config import VinePPOConfig

        check_instance(self)
        object.__setattr__(self, "trainer", job_trainer(self.trainer))
        object.__setattr__(self, "sharding_axis_dims", tuple(self.sharding_axis_dims))
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        real = {"model": self.model, "train_data": self.train_data, "eval_data": self.eval_data}
        if self.task == "gsm8k" and not all(real.values()):
            raise ValueError(f"task 'gsm8k' needs {sorted(k for k, v in real.items() if not v)} (local paths)")
        if self.task == "arithmetic" and any(real.values()):
            raise ValueError(
                f"task 'arithmetic' trains its own warm-up policy on built-in problems: "
                f"{sorted(k for k, v in real.items() if v)} are for task 'gsm8k'"
            )
        if "{question}" not in self.prompt_template:
            raise ValueError(f"prompt_template must contain {{question}}, got {self.prompt_template!r}")
        for name in ("train_problems", "eval_problems", "eval_max_tokens", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: no evaluation during training), got {self.eval_every}")
        if not self.output:
            raise ValueError("output must name a folder")
        check_fields(VinePPOConfig, self.trainer, "trainer.")
        if "shape" in self.warmup:
            raise ValueError("warmup.shape: the task's model shape is fixed (WarmupConfig's default)")
        check_fields(WarmupConfig, self.warmup, "warmup.")
        self.trainer_arguments()  # every trainer value checked now, before any model loads

    def trainer_arguments(self) -> Any:
        """The `VinePPOConfig` this job trains with: the job's settings (`job_settings`:
        store, checkpoints, logging under ``output``) with ``trainer`` on top."""
        from vinekv.trainer.vineppo_config import VinePPOConfig

        settings = job_settings(Path(self.output), self.seed, checkpoints=self.checkpoints, resume=self.resume)
        try:
            return VinePPOConfig(**{**settings, **self.trainer})
        except (ValueError, TypeError) as err:
            raise type(err)(f"trainer: {err}") from None

    def warmup_config(self) -> Any:
        from vinekv.tasks.warmup import WarmupConfig

        return WarmupConfig(**self.warmup)
