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
  TrajectoryNode, PromptNode, RootMeta   what the store's metadata says, typed (`vinekv.kvstore.schema`)
  get_codec                          KV codecs ("int8", "int4", "lossless")

Names load lazily: the store and codecs work without importing EasyDeL or JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

from vinekv.kvstore.process import silence_xla_logs

silence_xla_logs()  # before JAX loads: no screens of XLA CPU-feature lines (unless the user set the level)

_EXPORTS = {
    "CachedState": "vinekv.kvstore.state",
    "EncodedState": "vinekv.kvstore.state",
    "KVLayout": "vinekv.kvstore.state",
    "StalePolicyError": "vinekv.kvstore.policy",
    "check_policy": "vinekv.kvstore.policy",
    "capture_encoded": "vinekv.kvstore.capture",
    "capture_sequences": "vinekv.kvstore.capture",
    "capture_state": "vinekv.kvstore.capture",
    "check_fingerprint": "vinekv.kvstore.capture",
    "resume_from_state": "vinekv.kvstore.capture",
    "cache_from_states": "vinekv.kvstore.dense_cache",
    "extract_state": "vinekv.kvstore.dense_cache",
    "forward_chunk": "vinekv.kvstore.dense_cache",
    "kv_layout": "vinekv.kvstore.dense_cache",
    "policy_fingerprint": "vinekv.kvstore.fingerprint",
    "SnapshotStore": "vinekv.kvstore.store",
    "StoreError": "vinekv.kvstore.errors",
    "StoreFormatError": "vinekv.kvstore.errors",
    "MissingEntryError": "vinekv.kvstore.errors",
    "CorruptChunkError": "vinekv.kvstore.errors",
    "CorruptMetadataError": "vinekv.kvstore.errors",
    "IntegrityError": "vinekv.kvstore.errors",
    "StoreProblem": "vinekv.kvstore.store",
    "StoreSize": "vinekv.kvstore.store",
    "get_codec": "vinekv.kvstore.codecs",
    "TrajectoryNode": "vinekv.kvstore.schema",
    "PromptNode": "vinekv.kvstore.schema",
    "RootMeta": "vinekv.kvstore.schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
