"""vinekv's KV snapshot layer: capture/resume on EasyDeL dense caches, and the disk store.

Public API:
  capture_state, resume_from_state   the plan's snapshot/resume utilities
  capture_sequences                  whole rollouts -> one snapshot each, in fixed row chunks
  capture_encoded                    the same, encoded with a store codec on the device (codes only)
  extract_state, cache_from_states   live cache -> snapshot, snapshots -> fresh cache
  forward_chunk                      run a chunk of tokens from each row's cache position
  CachedState, KVLayout              the snapshot container and its layout descriptor
  EncodedState                       a trajectory's KV as a codec's codes, ready to spill
  policy_fingerprint                 cheap stable identity of a model's weights
  StalePolicyError                   a snapshot from another policy
  SnapshotStore                      the TensorStore/Zarr v3 snapshot store
  StoreError, IntegrityError, ...    its errors (IntegrityError: damaged or missing data, naming the file)
  TrajectoryNode, PromptNode, RootMeta   what the store's metadata says, typed (`kvstore.schema`)
  get_codec                          KV codecs ("int8", "int4", "lossless")

Names load lazily: the store and codecs work without importing EasyDeL or JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from kvstore.process import silence_xla_logs

silence_xla_logs()  # before JAX loads: no screens of XLA CPU-feature lines (unless the user set the level)

_EXPORTS = {
    "CachedState": "kvstore.state",
    "EncodedState": "kvstore.state",
    "KVLayout": "kvstore.state",
    "StalePolicyError": "kvstore.policy",
    "check_policy": "kvstore.policy",
    "capture_encoded": "kvstore.capture",
    "capture_sequences": "kvstore.capture",
    "capture_state": "kvstore.capture",
    "check_fingerprint": "kvstore.capture",
    "resume_from_state": "kvstore.capture",
    "cache_from_states": "kvstore.dense_cache",
    "extract_state": "kvstore.dense_cache",
    "forward_chunk": "kvstore.dense_cache",
    "kv_layout": "kvstore.dense_cache",
    "policy_fingerprint": "kvstore.fingerprint",
    "SnapshotStore": "kvstore.store",
    "StoreError": "kvstore.errors",
    "StoreFormatError": "kvstore.errors",
    "MissingEntryError": "kvstore.errors",
    "CorruptChunkError": "kvstore.errors",
    "CorruptMetadataError": "kvstore.errors",
    "IntegrityError": "kvstore.errors",
    "StoreProblem": "kvstore.store",
    "StoreSize": "kvstore.store",
    "get_codec": "kvstore.codecs",
    "TrajectoryNode": "kvstore.schema",
    "PromptNode": "kvstore.schema",
    "RootMeta": "kvstore.schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
