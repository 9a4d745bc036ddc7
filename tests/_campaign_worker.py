"""Subprocess of the reliability campaign (tests/reliability_campaign.py): one store operation,
announced line by line on stdout so the harness knows what had finished when it SIGKILLed it.

Usage: python tests/_campaign_worker.py OP JSON_ARGS

  spill     {path, codec, durability, run, count, group}   spills trajectories 0..count-1 that are
            not in the run yet (a resumed spill), ``group`` per flush; "committed N" after each flush
  annotate  {path, run}   writes ``mc_test`` (`mc_value`) on every trajectory that lacks it, like a
            resumed replay; "annotated ID" after each annotate
  delete    {path, run}   deletes the run; "deleted"
  create    {path, codec, mode, wait}   opens (creates) the store; "created CODEC" or "exists"

Every op prints "ready" once the store is open (``create``: "begin" before opening) and "done"
at the end. No JAX: the KV is synthetic (`campaign_state`), cheap to regenerate in the harness.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from typing import Any

import numpy as np

from vinekv.kvstore import CachedState, KVLayout, SnapshotStore
from vinekv.kvstore.codecs import get_codec

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32", vocab_size=260, model_type="llama")
CHUNK_TOKENS = 64
MAX_LENGTH = 256
FINGERPRINT = "cd" * 16


@functools.cache
def _noise() -> np.ndarray:
    shape = (2, LAYOUT.num_layers, 1, MAX_LENGTH, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return np.random.default_rng(1).standard_normal(shape, dtype=np.float32)


def prompt_len(n: int) -> int:
    """Trajectory ``n`` uses prompt ``n % 3`` (trajectories n, n+3, ... share its node)."""
    return 16 + 8 * (n % 3)


def length(n: int) -> int:
    """90..229 tokens: every trajectory spans 2-4 chunks of 64, its response at least 2."""
    return 90 + (53 * n) % 140


def campaign_state(n: int) -> CachedState:
    """Trajectory ``n``: noise plus ``n``, the prompt (``n % 3``) shared with its group."""
    size, plen, group = length(n), prompt_len(n), n % 3
    keys, values = (_noise()[c, :, :, :size] + np.float32(n) for c in (0, 1))
    for part, sign in ((keys, 1), (values, -1)):
        part[:, :, :plen] = _noise()[0, :, :, :plen] * sign + np.float32(0.25 * group)
    ids = (np.arange(size, dtype=np.int32) * (n + 1) % 256)[None]
    ids[0, :plen] = (np.arange(plen) + 7 * group) % 256
    return CachedState(keys, values, ids, LAYOUT, FINGERPRINT)


def campaign_fields(n: int) -> dict[str, Any]:
    return {"reward": n * 0.5, "steps": [prompt_len(n), prompt_len(n) + 5], "gold": f"g{n}", "extra": {"k": [n, None]}}


@functools.cache
def expected_kv(n: int, codec_name: str) -> np.ndarray:
    """``[layers, 2, length, heads, head_dim]`` float32 that a full read of trajectory ``n`` must
    return: the KV itself (lossless) or encode -> decode of its prompt and response nodes."""
    state, plen = campaign_state(n), prompt_len(n)
    if codec_name == "lossless":
        return np.stack([state.keys[:, 0], state.values[:, 0]], axis=1)
    codec = get_codec(codec_name)
    parts = []
    for lo, hi in ((0, plen), (plen, state.position)):
        if hi > lo:
            codes = codec.encode(state.keys[:, 0, lo:hi], state.values[:, 0, lo:hi])
            parts.append(codec.decode({k: v.data for k, v in codes.items()}, LAYOUT.dtype, np.float32))
    return np.concatenate(parts, axis=2)


def mc_value(tid: str, kv: np.ndarray, plen: int) -> dict[str, Any]:
    """A deterministic MC-like record of one trajectory, from the KV a replay reads back."""
    size = kv.shape[2]
    positions = sorted({plen, plen + (size - plen) // 2, size})
    seed = int(hashlib.blake2b(tid.encode(), digest_size=4).hexdigest(), 16)
    means = [float(np.float64(kv[:, :, :t].astype(np.float64).mean())) for t in positions]
    return {"positions": positions, "mean": means, "returns": [[(seed >> k) & 1 for k in range(4)] for _ in positions]}


def _say(line: str) -> None:
    print(line, flush=True)


def _spill(args: dict[str, Any]) -> None:
    with SnapshotStore.open(
        args["path"], codec=args["codec"], chunk_tokens=CHUNK_TOKENS, durability=args["durability"]
    ) as store:
        present = set(store.trajectories(args["run"])) if args["run"] in store.runs() else set()
        _say("ready")
        todo = [n for n in range(args["count"]) if f"t{n:03d}" not in present]
        group = args.get("group", 1)
        for i in range(0, len(todo), group):
            batch = todo[i : i + group]
            for n in batch:
                store.spill(args["run"], f"t{n:03d}", campaign_state(n), prompt_len(n), **campaign_fields(n))
            store.flush()
            for n in batch:
                _say(f"committed {n}")
    _say("done")


def _annotate(args: dict[str, Any]) -> None:
    run = args["run"]
    with SnapshotStore.open(args["path"], mode="r+") as store:
        _say("ready")
        for tid in store.trajectories(run):
            info = store.trajectory_info(run, tid)
            if "mc_test" in info["fields"]:  # settled: a resumed replay skips it
                continue
            state = store.read_prefix(run, tid, info["length"])
            kv = np.stack([state.keys[:, 0], state.values[:, 0]], axis=1)
            store.annotate(run, tid, mc_test=mc_value(tid, kv, info["prompt_len"]))
            _say(f"annotated {tid}")
    _say("done")


def _delete(args: dict[str, Any]) -> None:
    with SnapshotStore.open(args["path"], mode="r+") as store:
        _say("ready")
        store.delete_run(args["run"])
        _say("deleted")
    _say("done")


def _create(args: dict[str, Any]) -> None:
    if args.get("wait"):
        sys.stdin.readline()  # racing creators start together
    _say("begin")
    try:
        with SnapshotStore.open(args["path"], mode=args.get("mode", "a"), codec=args["codec"]) as store:
            _say(f"created {store.codec.name}")
    except FileExistsError:
        _say("exists")
    _say("done")


OPS = {"spill": _spill, "annotate": _annotate, "delete": _delete, "create": _create}

if __name__ == "__main__":
    OPS[sys.argv[1]](json.loads(sys.argv[2]))
