"""vinekv's KV snapshot layer: capture/resume on EasyDeL dense caches, and (next) the disk store.

Public API:
  capture_state, resume_from_state   the plan's snapshot/resume utilities
  extract_state, cache_from_states   live cache -> snapshot, snapshots -> fresh cache
  forward_chunk                      run a chunk of tokens from each row's cache position
  CachedState, KVLayout              the snapshot container and its layout descriptor
  policy_fingerprint                 cheap stable identity of a model's weights
  StalePolicyError                   a snapshot from another policy
"""

from kvstore.capture import StalePolicyError, capture_state, check_fingerprint, resume_from_state
from kvstore.dense_cache import cache_from_states, extract_state, forward_chunk, kv_layout
from kvstore.fingerprint import policy_fingerprint
from kvstore.state import CachedState, KVLayout

__all__ = [
    "CachedState",
    "KVLayout",
    "StalePolicyError",
    "cache_from_states",
    "capture_state",
    "check_fingerprint",
    "extract_state",
    "forward_chunk",
    "kv_layout",
    "policy_fingerprint",
    "resume_from_state",
]
