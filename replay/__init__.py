"""Branch replay: continuations from KV snapshots, scored and folded into Monte-Carlo values.

Public API:
  generate_branches, Branches      the sampler harness (EasyDeL SamplingParams; engine auto/vanilla)
  replay_run, ReplayConfig         offline replay of a stored run into MC values in the store
  mc_values, branch_returns, MCStats   MC value math
  trajectory_states, select_states, step_starts, lite_anchors, valued_states   which states to value
  MCRecord                         the MC values stored with a trajectory (``fields["mc"]``)
  score                            reward functions (prompts, completions, **fields)
  decode, decode_rows, Sampling, prefill, sample_tokens, truncated_logits, row_keys_for
                                   reproducible decoding (one on-device loop per batch of rows)
"""

from vinekv.kvstore.process import silence_xla_logs

silence_xla_logs()  # before JAX loads: no screens of XLA CPU-feature lines (unless the user set the level)

from vinekv.replay.branch_replay import ReplayConfig, ReplayReport, replay_run, select_states, trajectory_states  # noqa: E402
from vinekv.replay.decode import (  # noqa: E402
    Decoded,
    Sampling,
    decode,
    decode_rows,
    prefill,
    row_keys_for,
    sample_tokens,
    truncated_logits,
)
from vinekv.replay.rewards import score  # noqa: E402
from vinekv.replay.sampler import Branches, branch_keys, eos_token_ids, generate_branches  # noqa: E402
from vinekv.replay.steps import content_length, lite_anchors, split_points, step_starts, token_boundaries, valued_states  # noqa: E402
from vinekv.replay.text import text_offsets  # noqa: E402
from vinekv.replay.values import MCRecord, MCStats, branch_returns, mc_values  # noqa: E402

__all__ = [
    "Branches",
    "MCRecord",
    "Decoded",
    "Sampling",
    "MCStats",
    "ReplayConfig",
    "ReplayReport",
    "branch_keys",
    "branch_returns",
    "content_length",
    "eos_token_ids",
    "decode",
    "decode_rows",
    "generate_branches",
    "lite_anchors",
    "mc_values",
    "prefill",
    "replay_run",
    "row_keys_for",
    "sample_tokens",
    "score",
    "select_states",
    "split_points",
    "step_starts",
    "text_offsets",
    "token_boundaries",
    "trajectory_states",
    "truncated_logits",
    "valued_states",
]
