"""Branch replay: continuations from KV snapshots, scored and folded into Monte-Carlo values.

Public API:
  generate_branches, Branches      the sampler harness (EasyDeL SamplingParams; engine auto/vanilla)
  replay_run, ReplayConfig         offline replay of a stored run into MC values in the store
  mc_values, branch_returns, MCStats   MC value math
  step_starts, lite_anchors, cap_states   which states to value
  score                            reward functions (prompts, completions, **fields)
  decode, prefill, sample_tokens, row_keys_for   reproducible decoding from a dense cache
"""

from replay.branch_replay import ReplayConfig, ReplayReport, replay_run, select_states
from replay.decode import Decoded, decode, prefill, row_keys_for, sample_tokens
from replay.rewards import score
from replay.sampler import Branches, branch_keys, generate_branches
from replay.steps import cap_states, lite_anchors, split_points, step_starts, token_boundaries
from replay.values import MCStats, branch_returns, mc_values

__all__ = [
    "Branches",
    "Decoded",
    "MCStats",
    "ReplayConfig",
    "ReplayReport",
    "branch_keys",
    "branch_returns",
    "cap_states",
    "decode",
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
    "token_boundaries",
]
