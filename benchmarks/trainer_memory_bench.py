"""Peak host memory of a full-VinePPO value estimation, cache strategy ``memory`` vs ``disk``.

    PYTHONPATH=. .venv/bin/python benchmarks/trainer_memory_bench.py

The strategies differ only in where the rollouts' KV lives between capture and branch replay,
so this measures that stage of a training step (`vinekv.trainer.value_estimation.estimate_values`:
capture, keep or spill, branch replay, MC values) on N rollouts of 64 prompt + 448 response
tokens, N = 8, 32, 128. Generation and the policy update are the same for every strategy and
are left out (on this CPU they would take hours at N = 128 for a model with this KV size).

Model: Qwen2-0.5B's KV geometry (24 layers, 2 KV heads, head_dim 64, float32 KV: 24 KiB per
token) with a small hidden size so capture runs in seconds. Replay: full mode, 2 states per
rollout, K = 2 branches of 4 tokens. Store codec int8 (the default), spill buffer 64 MiB
(`vineppo_spill_buffer_mb`: raw KV queued for the background writers before a spill waits).

Each (strategy, N) runs in a fresh process: the model is built, the estimation is run once on 2
rollouts (compiles every program; kept small because memory it frees stays with the allocator
and would hide part of the measured run), the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs`` = 5), the measured run follows, and the peak (``VmHWM``) minus the
resident size just before is reported. Results: benchmarks/results/trainer_memory.json and
docs/img/trainer_memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT, RESPONSE = 64, 448
# Trajectories of the warm-up run: enough to compile every program (capture chunks are padded to 8
# rows), few enough that the memory it frees, and the allocator keeps, hides nothing measured later.
WARMUP = 2
SPILL_BUFFER_MIB = 64  # the trainer's vineppo_spill_buffer_mb: raw KV queued for writing at most


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(strategy: str, n: int, folder: str, codec: str = "int8") -> dict:
    from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

    silence_xla_logs()
    import jax
    import numpy as np

    enable_compilation_cache()
    quiet_logs()
    from vinekv.kvstore.store import SnapshotStore
    from vinekv.models import QWEN2_0P5B_KV, build_model, build_tokenizer
    from vinekv.replay.branch_replay import ReplayConfig
    from vinekv.trainer.rollouts import Rollout
    from vinekv.trainer.value_estimation import estimate_values

    shape = QWEN2_0P5B_KV.__class__(
        **{**QWEN2_0P5B_KV.__dict__, "hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 4}
    )
    model = build_model("qwen2", shape, seed=0)
    tokenizer = build_tokenizer()
    rng = np.random.default_rng(0)

    def rollouts(count: int) -> list[Rollout]:
        return [
            Rollout(
                rng.integers(0, 256, PROMPT).astype(np.int32), rng.integers(0, 256, RESPONSE).astype(np.int32), i, i
            )
            for i in range(count)
        ]

    def reward(prompts, completions, **kwargs):
        return [sum(b % 2 == 0 for b in c.encode()) / max(1, len(c.encode())) for c in completions]

    config = ReplayConfig(mode="full", branches=2, max_tokens=4, max_states=2, unfinished_reward=None)
    store = (
        SnapshotStore.open(Path(folder) / "kv", codec=codec, max_inflight_bytes=SPILL_BUFFER_MIB * 2**20)
        if strategy == "disk"
        else None
    )

    def splitter(text: str) -> list[int]:
        return list(range(64, len(text), 64))

    def run(count: int, name: str):
        return estimate_values(
            strategy, model, tokenizer, reward, rollouts(count), config, store=store, run=name, splitter=splitter
        )

    run(WARMUP, "warmup")
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    values, stats = run(n, "measured")
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    device = jax.devices()[0]
    device_peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    if store is not None:
        store.close()
    kv_per_rollout = (PROMPT + RESPONSE) * shape.num_hidden_layers * 2 * shape.num_key_value_heads * 64 * 4
    return {
        "strategy": strategy,
        "trajectories": n,
        "rss_before_mib": before / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_over_before_mib": (peak - before) / 1024,
        "peak_kv_bytes_held_mib": stats.peak_kv_bytes / 2**20,
        "kv_of_all_rollouts_mib": n * kv_per_rollout / 2**20,
        "store_mib": stats.store_bytes / 2**20,
        "states": stats.replay.states,
        "seconds": seconds,
        "accelerator_peak_bytes": device_peak,
        "spill_buffer_mib": SPILL_BUFFER_MIB if strategy == "disk" else None,
        "codec": codec if strategy == "disk" else None,
        "returns_finite": bool(all(np.isfinite(r).all() for v in values for r in v.returns)),
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, marker in (("memory", "o"), ("disk", "s")):
        pts = sorted((r["trajectories"], r["peak_over_before_mib"]) for r in rows if r["strategy"] == strategy)
        ax.plot(*zip(*pts, strict=True), marker=marker, label=f"{strategy}")
    kv = sorted({(r["trajectories"], r["kv_of_all_rollouts_mib"]) for r in rows})
    ax.plot(*zip(*kv, strict=True), "k:", label="KV of all rollouts (float32)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("trajectories per step")
    ax.set_ylabel("peak host memory over baseline (MiB)")
    ax.set_title("full-VinePPO value estimation: memory vs disk")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--strategies", nargs="+", default=["memory", "disk"])
    parser.add_argument("--codec", default="int8", choices=["int8", "int4", "lossless"], help="store codec of disk")
    parser.add_argument("--child", nargs=2, metavar=("STRATEGY", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory(dir=REPO / "benchmarks") as folder:
            print(json.dumps(child(args.child[0], int(args.child[1]), folder, args.codec)))
        return
    rows = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for n in args.trajectories:
        for strategy in args.strategies:  # interleaved, so drift hits both strategies alike
            out = subprocess.run(
                [sys.executable, __file__, "--child", strategy, str(n), "--codec", args.codec],
                env=env,
                capture_output=True,
                text=True,
            )
            if out.returncode:
                raise RuntimeError(f"{strategy} N={n} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(
                f"{strategy:>9} N={n:>4}: peak +{r['peak_over_before_mib']:7.1f} MiB "
                f"over {r['rss_before_mib']:.0f} MiB "
                f"(KV of all rollouts {r['kv_of_all_rollouts_mib']:.0f} MiB, store {r['store_mib']:.0f} MiB, "
                f"{r['seconds']:.1f} s)",
                flush=True,
            )
    result = {
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/trainer_memory_bench.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    (REPO / "benchmarks/results").mkdir(exist_ok=True)
    (REPO / "benchmarks/results/trainer_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, REPO / "docs/img/trainer_memory.png")


if __name__ == "__main__":
    main()
