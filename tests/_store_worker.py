"""Subprocess for the kill-mid-spill test: spills synthetic trajectories forever, announcing commits.

Usage: python tests/_store_worker.py STORE_PATH [trajectory|flush]
Prints "committed N" after trajectory N is durable. Trajectory N's KV is `synthetic_state(N)`.
With ``flush`` (group commit) it spills GROUP trajectories between flushes.
"""

from __future__ import annotations

import functools
import sys

import numpy as np

from vinekv.kvstore import CachedState, KVLayout, SnapshotStore

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype="float32", vocab_size=260, model_type="llama")
PROMPT_LEN = 16
GROUP = 4


@functools.cache
def _noise(length: int) -> np.ndarray:
    shape = (2, LAYOUT.num_layers, 1, length, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def synthetic_state(n: int, length: int = 1500) -> CachedState:
    """Trajectory ``n``: shared noise plus ``n`` (cheap to regenerate), the same 16-token prompt."""
    keys, values = _noise(length) + np.float32(n)
    keys[:, :, :PROMPT_LEN], values[:, :, :PROMPT_LEN] = _noise(length)[:, :, :, :PROMPT_LEN]
    ids = (np.arange(length, dtype=np.int32) * (n + 1) % 256)[None]
    ids[0, :PROMPT_LEN] = np.arange(PROMPT_LEN)
    return CachedState(keys, values, ids, LAYOUT, "ab" * 16)


if __name__ == "__main__":
    durability = sys.argv[2] if len(sys.argv) > 2 else "trajectory"
    group = GROUP if durability == "flush" else 1
    with SnapshotStore.open(sys.argv[1], codec="lossless", chunk_tokens=64, durability=durability) as store:
        n = 0
        while True:
            for _ in range(group):
                store.spill("run0", f"traj{n:04d}", synthetic_state(n), PROMPT_LEN, reward=float(n))
                n += 1
            store.flush()
            print(f"committed {n - 1}", flush=True)
