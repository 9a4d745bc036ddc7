"""Branch replay: decoding continuations from KV snapshots and folding their rewards into MC values.

Public API so far: `decode` (reproducible token-by-token decoding from a dense cache),
`prefill` (right-padded prompts into a fresh cache), `sample_tokens`, `row_keys_for`.
The branch sampler harness and offline replay (`branch_replay`) come with the replay issue.
"""

from replay.decode import Decoded, decode, prefill, row_keys_for, sample_tokens

__all__ = ["Decoded", "decode", "prefill", "row_keys_for", "sample_tokens"]
