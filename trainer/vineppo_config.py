"""`VinePPOConfig`: EasyDeL's `GRPOConfig` plus the VinePPO plan's fields, validated at construction."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from easydel.trainers.group_relative_policy_optimization.grpo_config import GRPOConfig

from vinekv.kvstore.codecs import CODECS
from vinekv.kvstore.store import DURABILITY
from vinekv.replay.branch_replay import ReplayConfig
from vinekv.replay.engines import ENGINES, ESurgeOptions
from vinekv.replay.steps import SELECTIONS
from vinekv.trainer.field_types import check_instance
from vinekv.trainer.value_estimation import STRATEGIES

logger = logging.getLogger(__name__)

MODES = ("off", "lite", "full")
BASELINES = ("none", "batch")

# The VinePPO reference's hyper-parameters where GRPO's defaults differ (Kazemnejad et al. 2024;
# McGill-NLP/VinePPO at efe7228, configs/; docs/training.md cites the file and line of each).
PAPER_PRESET: dict[str, object] = {
    "vineppo_mode": "full",
    "vineppo_branches": 9,  # episode_generators/9rolls.jsonnet: samples 9
    "vineppo_step_delimiter": "\n",  # tasks/gsm8k.py: intermediate_step_delimiter
    "vineppo_state_selection": "first",  # math_episode_generator_with_mc_advantages.py: max_step_for_value_estimation
    "vineppo_unfinished_reward": 0.0,  # math_episode_generator.jsonnet: unfinished_response_penalty 0.0
    "vineppo_gamma": 1.0,  # advantages: r_i + V_{i+1} - V_i
    "vineppo_whiten_advantages": True,  # trainers/ppo_MATH.jsonnet: whiten_advantages true
    "vineppo_ppo_epochs": 2,  # trainers/ppo_MATH.jsonnet: num_epochs_per_iteration 2
    "beta": 1e-4,  # trainers/refKl0.0001.jsonnet (a loss term: trainers/klLoss.jsonnet)
    "epsilon": 0.2,  # trainers/ppo_MATH.jsonnet: cliprange 0.2
    "epsilon_high": 0.2,
    "loss_type": "bnpo",  # ppo_trainer.py: masked_mean over the batch's response tokens
    "temperature": 0.6,  # polIter_*_ppo_MATH.jsonnet: sampling temperature, rollouts and MC alike
    "top_p": 0.9,
    "top_k": 0,
    "learning_rate": 1e-6,  # trainers/ppo_MATH.jsonnet
    "weight_decay": 0.0,
    "clip_grad": 1.0,
    "num_return_sequences": 8,  # polIter_*_ppo_MATH.jsonnet: num_rollouts_per_sample 8
    "max_completion_length": 1024,  # polIter_*_ppo_MATH.jsonnet: max_tokens 1024
}


@dataclass
class VinePPOConfig(GRPOConfig):
    """GRPO training with VinePPO credit assignment.

    ``vineppo_mode``: ``off`` (plain GRPO advantages), ``lite`` (MC values at anchors, bootstrapped
    into token GAE: ``mc_gae``) or ``full`` (MC values at every step start). Branch replay reads
    snapshots kept in memory, spilled to ``vineppo_store`` (``disk``), or re-prefilled from tokens
    (``recompute``).

    The defaults are the configuration docs/benchmarks.md measures best: full VinePPO, K = 4
    branches per step start, 2 PPO epochs per batch, whitened advantages (`paper_preset` has the
    paper's K = 9 and its other settings).
    """

    vineppo_mode: str = field(default="full", metadata={"help": "off | lite | full"})
    vineppo_branches: int = field(default=4, metadata={"help": "full mode: K branches per step start"})
    vineppo_max_depth: int | None = field(
        default=None, metadata={"help": "full mode: token budget of a branch (default: max_completion_length)"}
    )
    vineppo_max_states: int | None = field(
        default=None, metadata={"help": "full mode: cap on valued states per response (the rest filled backwards)"}
    )
    vineppo_state_selection: str = field(
        default="first", metadata={"help": "full mode: which states a cap values: first | spread | entropy"}
    )
    vineppo_adaptive_ci: float | None = field(
        default=None,
        metadata={"help": "adaptive K: target 95% CI half-width of a value; rounds of K branches until met"},
    )
    vineppo_max_branches: int | None = field(
        default=None, metadata={"help": "adaptive K: cap on branches per state (default: the first round's K)"}
    )
    vineppo_engine: str = field(
        default="auto", metadata={"help": "branch engine: auto (eSurge on accelerators) | esurge | vanilla"}
    )
    vineppo_esurge_page_budget_mb: float | None = field(
        default=None,
        metadata={"help": "eSurge engine: MiB of KV pages (None: 16 on CPU, eSurge's own sizing on accelerators)"},
    )
    vineppo_esurge_page_size: int = field(default=16, metadata={"help": "eSurge engine: tokens per KV page"})
    vineppo_cache_strategy: str = field(default="memory", metadata={"help": "memory | disk | recompute"})
    vineppo_store: str | None = field(default=None, metadata={"help": "snapshot store path (required for disk)"})
    vineppo_codec: str = field(default="int8", metadata={"help": "store codec: int8 | int4-hadamard | int4 | lossless"})
    vineppo_spill_buffer_mb: int = field(
        default=256, metadata={"help": "disk: MiB of encoded KV queued for the store's writers before a spill waits"}
    )
    vineppo_spill_durability: str = field(
        default="flush",
        metadata={
            "help": "disk: 'flush' commits a step's rollouts together with one round of fsyncs (a crash loses "
            "only the unfinished step's, which are never used); 'trajectory' fsyncs each as it is written"
        },
    )
    vineppo_step_delimiter: str = field(default="\n", metadata={"help": "full mode: reasoning-step delimiter"})
    vineppo_gamma: float = field(default=1.0, metadata={"help": "discount"})
    vineppo_lambda: float = field(default=0.95, metadata={"help": "lite mode: GAE lambda"})
    vineppo_whiten_advantages: bool = field(default=True, metadata={"help": "whiten advantages over the batch"})
    vineppo_baseline: str = field(default="none", metadata={"help": "none | batch: subtract the batch mean advantage"})
    vineppo_ppo_epochs: int = field(default=2, metadata={"help": "PPO epochs per generated batch"})
    vineppo_unfinished_reward: float | None = field(
        default=0.0, metadata={"help": "return of a branch cut off by its token budget (None: score it as it is)"}
    )
    vineppo_capture_rows: int = field(default=16, metadata={"help": "rollouts captured per forward (KV chunk)"})
    vineppo_keep_snapshots: bool = field(
        default=False, metadata={"help": "disk: keep each step's run in the store (for offline replay/inspection)"}
    )
    vineppo_offline_run: str | None = field(
        default=None, metadata={"help": "train from this MC-annotated run of vineppo_store instead of generating"}
    )
    vineppo_allow_stale: bool = field(
        default=False, metadata={"help": "offline: accept trajectories made by another policy than the initial one"}
    )
    vineppo_async_worker_env: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "async: environment of the replay worker process, e.g. {'CUDA_VISIBLE_DEVICES': '1'} or "
            "{'JAX_PLATFORMS': 'cpu'} to keep it off the trainer's accelerator"
        },
    )
    vineppo_async_replay: bool = field(
        default=False,
        metadata={
            "help": "disk: a worker process values batch N from the store while the trainer generates batch N+1 "
            "(with the policy before update N: one update of policy lag)"
        },
    )
    lite_anchor_stride: int | None = field(default=None, metadata={"help": "lite: extra anchor every N tokens"})
    lite_num_branches: int = field(default=4, metadata={"help": "lite: K branches per anchor"})
    lite_branch_max_len: int = field(default=128, metadata={"help": "lite: token budget of a branch"})

    def __post_init__(self, max_sequence_length: int | None, quantization_block: int | None):
        check_instance(self)  # a value of the wrong type (from a TOML file) is named before it is compared
        super().__post_init__(max_sequence_length, quantization_block)
        checks = [
            (
                self.max_training_steps is None or self.max_training_steps >= 1,
                f"max_training_steps must be >= 1 (policy updates) or None, got {self.max_training_steps}",
            ),
            (self.vineppo_mode in MODES, f"vineppo_mode must be one of {MODES}, got {self.vineppo_mode!r}"),
            (self.vineppo_engine in ENGINES, f"vineppo_engine must be one of {ENGINES}, got {self.vineppo_engine!r}"),
            (
                self.vineppo_cache_strategy in STRATEGIES,
                f"vineppo_cache_strategy must be one of {STRATEGIES}, got {self.vineppo_cache_strategy!r}",
            ),
            (
                self.vineppo_cache_strategy != "disk" or bool(self.vineppo_store),
                "vineppo_cache_strategy='disk' needs vineppo_store (a path or TensorStore kvstore URL)",
            ),
            (
                self.vineppo_offline_run is None or bool(self.vineppo_store),
                "vineppo_offline_run needs vineppo_store (the store holding that run)",
            ),
            (
                not self.vineppo_async_replay or self.vineppo_cache_strategy == "disk",
                "vineppo_async_replay values rollouts from the store: it needs vineppo_cache_strategy='disk', got "
                f"{self.vineppo_cache_strategy!r}",
            ),
            (
                not self.vineppo_async_replay or (self.vineppo_mode != "off" and self.vineppo_offline_run is None),
                "vineppo_async_replay needs vineppo_mode 'lite' or 'full' and no vineppo_offline_run",
            ),
            (
                not self.vineppo_async_replay or not str(self.vineppo_store).startswith("memory://"),
                "vineppo_async_replay: the worker process cannot see a memory:// store; use a path or a bucket",
            ),
            (
                self.vineppo_offline_run is None or self.vineppo_mode != "off",
                "vineppo_offline_run trains from MC values: vineppo_mode must be 'lite' or 'full', not 'off'",
            ),
            (
                self.vineppo_baseline in BASELINES,
                f"vineppo_baseline must be one of {BASELINES}, got {self.vineppo_baseline!r}",
            ),
            (
                self.vineppo_esurge_page_budget_mb is None or self.vineppo_esurge_page_budget_mb > 0,
                f"vineppo_esurge_page_budget_mb must be > 0, got {self.vineppo_esurge_page_budget_mb}",
            ),
            (
                self.vineppo_esurge_page_size >= 1,
                f"vineppo_esurge_page_size must be >= 1, got {self.vineppo_esurge_page_size}",
            ),
            (
                self.vineppo_spill_buffer_mb >= 1,
                f"vineppo_spill_buffer_mb must be >= 1, got {self.vineppo_spill_buffer_mb}",
            ),
            (self.vineppo_capture_rows >= 1, f"vineppo_capture_rows must be >= 1, got {self.vineppo_capture_rows}"),
            (
                self.vineppo_spill_durability in DURABILITY,
                f"vineppo_spill_durability must be one of {DURABILITY}, got {self.vineppo_spill_durability!r}",
            ),
            (
                self.vineppo_codec in CODECS,
                f"vineppo_codec must be one of {sorted(CODECS)}, got {self.vineppo_codec!r}",
            ),
            (self.vineppo_branches >= 1, f"vineppo_branches must be >= 1, got {self.vineppo_branches}"),
            (self.lite_num_branches >= 1, f"lite_num_branches must be >= 1, got {self.lite_num_branches}"),
            (self.lite_branch_max_len >= 1, f"lite_branch_max_len must be >= 1, got {self.lite_branch_max_len}"),
            (
                self.vineppo_max_depth is None or self.vineppo_max_depth >= 1,
                f"vineppo_max_depth must be >= 1 or None, got {self.vineppo_max_depth}",
            ),
            (
                self.vineppo_max_states is None or self.vineppo_max_states >= 1,
                f"vineppo_max_states must be >= 1 or None, got {self.vineppo_max_states}",
            ),
            (
                self.vineppo_state_selection in SELECTIONS,
                f"vineppo_state_selection must be one of {SELECTIONS}, got {self.vineppo_state_selection!r}",
            ),
            (
                self.vineppo_adaptive_ci is None or self.vineppo_adaptive_ci > 0,
                f"vineppo_adaptive_ci must be > 0 or None, got {self.vineppo_adaptive_ci}",
            ),
            (
                self.vineppo_max_branches is None or self.vineppo_max_branches >= self._first_round(),
                f"vineppo_max_branches must be >= the first round's K ({self._first_round()}) or None, "
                f"got {self.vineppo_max_branches}",
            ),
            (
                self.lite_anchor_stride is None or self.lite_anchor_stride >= 1,
                f"lite_anchor_stride must be >= 1 or None, got {self.lite_anchor_stride}",
            ),
            (0.0 <= self.vineppo_gamma <= 1.0, f"vineppo_gamma must be in [0, 1], got {self.vineppo_gamma}"),
            (0.0 <= self.vineppo_lambda <= 1.0, f"vineppo_lambda must be in [0, 1], got {self.vineppo_lambda}"),
            (self.vineppo_ppo_epochs >= 1, f"vineppo_ppo_epochs must be >= 1, got {self.vineppo_ppo_epochs}"),
            (bool(self.vineppo_step_delimiter), "vineppo_step_delimiter must be a non-empty string"),
            (
                self.loss_type != "cispo",
                "loss_type='cispo' is not supported: VinePPOTrainer's PPO loss (trainer.ppo_step) does not "
                "implement it",
            ),
            (
                self.delta is None,
                f"delta must be None, got {self.delta}: VinePPOTrainer's PPO loss (trainer.ppo_step) does not "
                "implement two-sided clipping",
            ),
        ]
        errors = [message for ok, message in checks if not ok]
        if errors:
            raise ValueError("invalid VinePPOConfig: " + "; ".join(errors))
        if self.vineppo_mode != "off":
            self._pin_sampling()

    def _pin_sampling(self) -> None:
        """Makes the rollouts' sampling settings explicit, so branches sample like rollouts.

        Unset, EasyDeL's compiled ``generate`` would use the model's generation config (often
        top-k 50) and eSurge its own defaults (temperature 0.7, top-p 0.95, top-k 64); the values
        chosen here are the ones each path uses, now passed to it and to the branches alike.
        """
        if self.use_esurge_generation:  # eSurge reads `x or default`, so 0 cannot switch top-k off
            defaults = {"generation_temperature": 0.7, "generation_top_p": 0.95, "generation_top_k": 64}
        else:
            defaults = {"generation_temperature": 1.0, "generation_top_p": 1.0, "generation_top_k": 0}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.generation_temperature != 1.0:
            logger.warning(
                "rollouts sample at temperature %s, but the PPO ratio's log-probs are the untempered policy's "
                "(as in EasyDeL's GRPO; the VinePPO reference divides the logits by the sampling temperature): "
                "the update is off-policy. generation_temperature=1.0 keeps it exact.",
                self.generation_temperature,
            )

    @classmethod
    def paper_preset(cls, **overrides: object) -> VinePPOConfig:
        """A config with the VinePPO reference's hyper-parameters (`PAPER_PRESET`: K = 9, step
        delimiter ``"\\n"``, KL 1e-4, whitened advantages, 2 PPO epochs, clip 0.2, T 0.6 / top-p 0.9,
        ...), ``overrides`` on top. GSM8K in the paper also caps valued states: its
        ``max_step_for_value_estimation=25`` is ``vineppo_max_states=26`` here (the prompt state
        counts). GRPO's defaults stay the defaults of a plain ``VinePPOConfig()``."""
        return cls(**{**PAPER_PRESET, **overrides})

    def _first_round(self) -> int:
        return self.lite_num_branches if self.vineppo_mode == "lite" else self.vineppo_branches

    def esurge_options(self) -> ESurgeOptions:
        """The eSurge engine's sizing: prompt + completion fit one request."""
        return ESurgeOptions(
            page_size=self.vineppo_esurge_page_size,
            page_budget_mb=self.vineppo_esurge_page_budget_mb,
            max_model_len=self.max_prompt_length + self.max_completion_length,
        )

    def replay_config(self, seed: int = 0, stop_token_ids: tuple[int, ...] = ()) -> ReplayConfig:
        """The branch-replay settings of this mode (``off`` has none).

        A branch from response position b gets ``min(budget, max_completion_length - b)`` tokens
        (budget: ``vineppo_max_depth`` / ``lite_branch_max_len``), samples like the rollouts'
        generation path, and stops on ``stop_token_ids`` besides the EOS ids.
        """
        if self.vineppo_mode == "off":
            raise ValueError("vineppo_mode='off' runs no branch replay")
        lite = self.vineppo_mode == "lite"
        return ReplayConfig(
            mode=self.vineppo_mode,
            branches=self._first_round(),
            max_tokens=self.lite_branch_max_len if lite else (self.vineppo_max_depth or self.max_completion_length),
            horizon=self.max_completion_length,
            temperature=self.generation_temperature,
            top_p=self.generation_top_p,
            top_k=self.generation_top_k,
            stop_token_ids=tuple(stop_token_ids),
            sampler="esurge" if self.use_esurge_generation else "generate",
            delimiter=self.vineppo_step_delimiter,
            max_states=None if lite else self.vineppo_max_states,
            state_selection=self.vineppo_state_selection,
            lite_anchor_stride=self.lite_anchor_stride,
            unfinished_reward=self.vineppo_unfinished_reward,
            max_branches=self.vineppo_max_branches,
            adaptive_ci=self.vineppo_adaptive_ci,
            seed=seed,
            engine=self.vineppo_engine,
        )

    __hash__ = GRPOConfig.__hash__
