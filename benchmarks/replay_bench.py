"""Branch replay benchmark: replay throughput vs plain sampling, and time-to-first-branch from a
stored 512-token prefix vs re-prefilling it.

    PYTHONPATH=. .venv/bin/python benchmarks/replay_bench.py

1. Throughput (tiny and Qwen2-0.5B-shaped models): 8 stored trajectories, one 128-token state
   each, K = 8 branches of 32 tokens (64 rows), decoded by `generate_branches` from snapshots
   read from the store; against plain sampling of the same number of tokens: 64 fresh
   128-token prompts prefilled and decoded 32 tokens with the same decode step. Rounds
   alternate the two; medians reported.
2. Time to first branch (Qwen2-0.5B-shaped): read a 512-token prefix from the store, write it
   into a cache broadcast to K = 8 rows and compute the first branch-token distribution, against
   prefilling the 512 tokens (batch 1, the cheapest re-prefill).

Results: benchmarks/results/replay.json and docs/img/replay_bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from easydel.inference.sampling_params import SamplingParams  # noqa: E402

from vinekv.kvstore import SnapshotStore, cache_from_states, capture_state, forward_chunk, policy_fingerprint  # noqa: E402
from vinekv.models import QWEN2_0P5B_KV, TINY, build_model  # noqa: E402
from vinekv.replay import decode, generate_branches, prefill, row_keys_for  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def throughput(name, shape, dtype, rounds, folder, states_n=8, k=8, prefix=128, new=32) -> dict:
    model = build_model("qwen2", shape, dtype=dtype, kv_dtype=dtype, seed=0)
    ids = np.random.default_rng(1).integers(0, 256, size=(states_n, prefix + 64)).astype(np.int32)
    with SnapshotStore.open(folder / f"{name}-store", codec="lossless") as store:
        full = capture_state(model, ids, prefix + 64)
        for i in range(states_n):
            store.spill("bench", f"t{i}", full.select(i), 16)
        store.flush()
        states = store.read_prefixes([("bench", f"t{i}", prefix) for i in range(states_n)], model=model)
    params = SamplingParams(n=k, max_tokens=new, temperature=1.0, ignore_eos=True)
    fresh = np.random.default_rng(2).integers(0, 256, size=(states_n * k, prefix)).astype(np.int32)
    keys = row_keys_for(0, states_n * k)

    def replay():
        out = generate_branches(model, states, params, seed=0, max_rows=states_n * k)
        return sum(int(b.lengths.sum()) for b in out)

    def plain():
        cache, logits = prefill(model, fresh, np.full(states_n * k, prefix), max_length=prefix + new + 64)
        out = decode(model, cache, logits, new, temperature=1.0, row_keys=keys)
        return out.tokens.size

    replay(), plain()  # compile both
    times = {"replay": [], "plain": []}
    for _ in range(rounds):
        for label, fn in (("replay", replay), ("plain", plain)):
            start = time.perf_counter()
            tokens = fn()
            times[label].append(time.perf_counter() - start)
    replay_tps = tokens / statistics.median(times["replay"])
    plain_tps = states_n * k * new / statistics.median(times["plain"])
    log(f"{name}: replay {replay_tps:.0f} tok/s, plain sampling {plain_tps:.0f} tok/s")
    return {
        "replay_tokens_per_s": replay_tps,
        "plain_tokens_per_s": plain_tps,
        "ratio": replay_tps / plain_tps,
        "rows": states_n * k,
        "prefix": prefix,
        "branch_tokens": new,
    }


def first_branch(rounds, folder, weights, prefix=512, k=8) -> dict:
    """Store read + inject + first-token forward vs re-prefill, as a replay does it: the model is
    split and its fingerprint taken once per replay, not per state."""
    dtype = {"bf16": jnp.bfloat16, "f32": jnp.float32}[weights]
    model = build_model("qwen2", QWEN2_0P5B_KV, dtype=dtype, kv_dtype=jnp.bfloat16, seed=0)
    split, fingerprint = model.split_module(), policy_fingerprint(model)
    ids = np.random.default_rng(3).integers(0, 256, size=(1, prefix + 32)).astype(np.int32)
    with SnapshotStore.open(folder / f"ttfb-store-{weights}", codec="int8") as store:
        store.spill("bench", "t0", capture_state(model, ids, prefix + 32), 16)
        store.flush()

        def from_store():
            state = store.read_prefix("bench", "t0", prefix, model=model, fingerprint=fingerprint)
            cache = cache_from_states(model, [state.prefix(prefix - 1)], max_length=prefix + 64, repeats=k)
            last = np.full((k, 1), state.token_ids[0, -1], np.int32)
            return jax.block_until_ready(forward_chunk(model, cache, last, split=split)[0])

        def reprefill():
            cache = model.init_cache(batch_size=1, max_length=prefix + 64)
            return jax.block_until_ready(forward_chunk(model, cache, ids[:, :prefix], split=split)[0])

        from_store(), reprefill()  # compile both
        times = {"store": [], "prefill": []}
        for _ in range(rounds):
            for label, fn in (("store", from_store), ("prefill", reprefill)):
                start = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - start)
    store_s, prefill_s = statistics.median(times["store"]), statistics.median(times["prefill"])
    log(
        f"time to first branch ({weights} weights): store {store_s * 1e3:.0f} ms vs re-prefill {prefill_s * 1e3:.0f} ms"
    )
    return {
        "store_read_inject_ms": store_s * 1e3,
        "reprefill_ms": prefill_s * 1e3,
        "speedup": prefill_s / store_s,
        "prefix": prefix,
        "branches": k,
        "codec": "int8",
        "kv": "bf16",
        "weights": weights,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/replay.json"))
    parser.add_argument("--plot", default=str(REPO / "docs/img/replay_bench.png"))
    args = parser.parse_args()
    enable_compilation_cache()
    quiet_logs()
    folder = Path(tempfile.mkdtemp(prefix="vinekv-replay-bench-"))
    results = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "throughput": {
            "tiny (f32)": throughput("tiny", TINY, jnp.float32, args.rounds, folder),
            "qwen2-0.5B-shaped (bf16)": throughput("q05", QWEN2_0P5B_KV, jnp.bfloat16, args.rounds, folder),
        },
        "first_branch": {w: first_branch(args.rounds, folder, w) for w in ("bf16", "f32")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    plot(results, Path(args.plot))
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(results["throughput"])
    ratios = [results["throughput"][n]["ratio"] for n in names]
    axes[0].bar(names, ratios, color="tab:blue")
    axes[0].axhline(0.9, color="k", ls="--", lw=1)
    axes[0].set_title("branch replay / plain sampling, tokens/s (target >= 0.9)", fontsize=9)
    fb = results["first_branch"]
    x = np.arange(len(fb))
    axes[1].bar(x - 0.2, [v["store_read_inject_ms"] for v in fb.values()], 0.4, label="store read + inject + 1 token")
    axes[1].bar(x + 0.2, [v["reprefill_ms"] for v in fb.values()], 0.4, label="re-prefill 512 tokens")
    axes[1].set_xticks(x, [f"{w} weights ({v['speedup']:.1f}x)" for w, v in fb.items()])
    axes[1].set_ylabel("ms")
    axes[1].legend(fontsize=8)
    axes[1].set_title("time to first branch, 512-token prefix, 8 branches (target >= 10x)", fontsize=9)
    fig.suptitle(f"vinekv branch replay; {results['machine']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
