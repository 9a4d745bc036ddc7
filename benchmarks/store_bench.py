"""Snapshot store benchmark: spill and prefix-read throughput vs plain numpy files, and restoring
a prefix into a cache vs re-prefilling it, in the Qwen2-0.5B KV geometry with a trained model's KV.

    PYTHONPATH=. .venv/bin/python benchmarks/store_bench.py [--trajectories 16] [--length 1024]

KV data: the arithmetic task's warmed-up policy (`warm_up`; 2 layers, 2 KV heads, head_dim 32)
captured on its own sampled responses, concatenated into one long token stream, then laid out in
Qwen2-0.5B's geometry (24 layers, 2 KV heads, head_dim 64, bf16): layer l, head h of a benchmark
trajectory takes the task model's last layer with its heads 0 and 1 side by side as its 64
channels, from a stream offset that differs per (trajectory, layer, head), so no two blocks are
copies (offsets 67 tokens apart, so no stream token appears twice in one 64-token chunk, the
unit zstd compresses). Every value is a real K/V element of a trained model (its per-channel
structure kept);
only the arrangement across layers is synthetic. The first layer is left out: with a 32-symbol
vocabulary its values are a function of the token alone (32 distinct vectors), which zstd
compresses far better than any layer of a real 24-layer model.

Each round times, side by side in one process: numpy (raw bf16 to one file per trajectory +
fsync; memmap + copy to read) and each store configuration; medians over rounds are reported.
Spill configurations: "host" spills the bf16 KV (the writer threads encode with numpy), "device"
encodes on the device first (`KVCodec.device_encode`, as the trainer's `disk` strategy does; on
this CPU-only machine the device is the CPU) and spills the codes, timed from KV to committed;
"codes" times only the host's share of that path (the codes are made before the timer starts:
what a host pays when an accelerator encodes); ``durability`` "trajectory" (fsync per
trajectory) or "flush" (group commit). Reads are warm
(page cache) with the chunk cache off, and again with it on (the chunks already decoded in
memory: a replay's repeated reads); decoded on the host, on the device (here: the CPU), or not
at all ("codes": the host's share when an accelerator decodes). Restore: read a 512-token
prefix and write it into a fresh dense cache (one row; and broadcast to K = 8 rows, as a
replay's branches need), vs prefilling the 512 tokens (batch 1) with the bf16 weights of a
Qwen2-0.5B-shaped model, alternating (each restore right after a prefill, as reads come right
after decode steps in a replay), and restores back to back. Results: benchmarks/results/store.json and
docs/img/store_bench.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from vinekv.kvstore import CachedState, SnapshotStore, capture_sequences, get_codec, kv_layout, policy_fingerprint  # noqa: E402
from vinekv.kvstore.dense_cache import cache_from_states, forward_chunk  # noqa: E402
from vinekv.kvstore.state import EncodedState  # noqa: E402
from vinekv.models import QWEN2_0P5B_KV, build_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT_LEN = 64
# (label, codec spec, path, durability)
SPILLS = [
    ("lossless host", {"name": "lossless"}, "host", "trajectory"),
    ("int8 host", {"name": "int8"}, "host", "trajectory"),
    ("int8 device", {"name": "int8"}, "device", "trajectory"),
    ("int8 device flush", {"name": "int8"}, "device", "flush"),
    ("int8 codes", {"name": "int8"}, "codes", "trajectory"),
    ("int8 codes flush", {"name": "int8"}, "codes", "flush"),
    ("int8-zstd0 codes flush", {"name": "int8", "zstd_level": 0}, "codes", "flush"),
    ("int4 device flush", {"name": "int4"}, "device", "flush"),
    ("int4 codes flush", {"name": "int4"}, "codes", "flush"),
    ("int4-hadamard device flush", {"name": "int4-hadamard"}, "device", "flush"),
    ("int4-hadamard codes flush", {"name": "int4-hadamard"}, "codes", "flush"),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def task_kv_stream(problems: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V ``[2 layers, tokens, 2 heads, 32]`` (float32) of the warm-up policy on its own
    sampled responses to ``problems`` held-out problems, concatenated along tokens."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from value_quality_bench import replay_config, sample_responses

    from vinekv.tasks.arithmetic import make_dataset
    from vinekv.tasks.warmup import WarmupConfig, warm_up

    warmup = WarmupConfig()
    policy = warm_up(warmup)
    data = make_dataset(problems, 777, warmup.task_steps, warmup.operand_max)
    args = argparse.Namespace(horizon=40, seed=0, max_rows=256)
    trajectories = sample_responses(policy.model, policy.tokenizer, data, replay_config(args, 1))
    states = list(capture_sequences(policy.model, [t.tokens for t in trajectories], batch_rows=16))
    keys = np.concatenate([s.keys[:, 0] for s in states], axis=1)
    values = np.concatenate([s.values[:, 0] for s in states], axis=1)
    return keys, values


def qwen_shaped(stream: tuple[np.ndarray, np.ndarray], index: int, length: int, layout) -> tuple[np.ndarray, ...]:
    """Keys/values ``[24, length, 2, 64]`` bf16 from the task stream (see the module docstring)."""
    out = []
    slots = layout.num_layers * layout.num_kv_heads
    for part in stream:
        total = part.shape[1] - length
        if total < 67 * (slots - 1) + 64:
            raise ValueError(f"a task KV stream of {part.shape[1]} tokens is too short: raise --problems")
        blocks = np.empty((layout.num_layers, length, layout.num_kv_heads, layout.head_dim), ml_dtypes.bfloat16)
        for layer in range(layout.num_layers):
            for head in range(layout.num_kv_heads):
                off = (index * 997 + (layer * layout.num_kv_heads + head) * 67) % total
                src = part[-1, off : off + length]  # [length, 2 task heads, 32]
                blocks[layer, :, head] = src.reshape(length, -1)[:, : layout.head_dim]
        out.append(blocks)
    return tuple(out)


def numpy_write(folder: Path, states: list[CachedState]) -> float:
    start = time.perf_counter()
    for i, state in enumerate(states):
        with open(folder / f"traj{i}.bin", "wb") as fh:
            state.keys.view(np.uint16).tofile(fh)
            state.values.view(np.uint16).tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())
    return time.perf_counter() - start


def numpy_read(folder: Path, states: list[CachedState], t: int) -> float:
    shape = (2, *states[0].keys.shape)
    start = time.perf_counter()
    for i in range(len(states)):
        raw = np.memmap(folder / f"traj{i}.bin", dtype=np.uint16, mode="r", shape=shape)
        np.array(raw[:, :, :, :t])
    return time.perf_counter() - start


def device_encoded(codec, device_kv, state: CachedState) -> EncodedState:
    """The trainer's path: encode prompt and response on the device, copy only the codes."""
    keys, values = device_kv
    parts = []
    for lo, hi in ((0, PROMPT_LEN), (PROMPT_LEN, state.position)):
        codes = jax.device_get(codec.device_encode(keys[:, lo:hi], values[:, lo:hi], hi - lo))
        parts.append(codec.trim(codes, hi - lo))
    return EncodedState(*parts, codec.spec(), state.token_ids, PROMPT_LEN, state.layout, state.fingerprint)


def store_write(path: Path, spec, how: str, durability: str, states, device_kvs) -> float:
    codec = get_codec(spec)
    ready = [device_encoded(codec, device_kvs[i], state) for i, state in enumerate(states)] if how == "codes" else None
    with SnapshotStore.open(path, mode="w-", codec=codec, durability=durability) as store:
        start = time.perf_counter()
        for i, state in enumerate(states):
            item = device_encoded(codec, device_kvs[i], state) if how == "device" else state
            store.spill("bench", f"traj{i:03d}", ready[i] if ready else item, PROMPT_LEN)
        store.flush()
        return time.perf_counter() - start


def store_read(store: SnapshotStore, count: int, t: int, how: str) -> float:
    """Seconds to read ``[0, t)`` of every trajectory: decoded on the host or on the device, or
    only the codes (the host's share when an accelerator decodes)."""
    requests = [("bench", f"traj{i:03d}", t) for i in range(count)]
    start = time.perf_counter()
    if how == "codes":
        plans = [store.plan_read(*request) for request in requests]
        started = [[part.start() for part in plan.parts] for plan in plans]
        for plan, futures in zip(plans, started, strict=True):
            for part, part_futures in zip(plan.parts, futures, strict=True):
                part.result(part_futures, plan.what)
    else:
        states = store.read_prefixes(requests, on_device=how == "device")
        jax.block_until_ready([s.keys for s in states])
    return time.perf_counter() - start


def restore_vs_prefill(states, folder: Path, rounds: int, prefix: int = 512) -> dict:
    """Read a ``prefix``-token snapshot and inject it into a fresh dense cache (one row, and K = 8
    rows as a replay's branches need), vs prefilling the ``prefix`` tokens for one row."""
    model = build_model("qwen2", QWEN2_0P5B_KV, dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, seed=0)
    layout, fingerprint, split = kv_layout(model), policy_fingerprint(model), model.split_module()
    state = dataclasses.replace(states[0], layout=layout, fingerprint=fingerprint)
    ids = state.token_ids % layout.vocab_size
    state = dataclasses.replace(state, token_ids=ids)
    variants = [(codec, 2**28, False, 1) for codec in ("int8", "int4", "lossless")]
    variants += [("int8", 0, False, 1), ("int8", 2**28, True, 1), ("int8", 2**28, False, 8), ("int8", 2**28, True, 8)]
    out = {}
    for codec in ("int8", "int4", "lossless"):
        with SnapshotStore.open(folder / f"restore-{codec}", mode="w-", codec=codec) as store:
            store.spill("bench", "t0", state, PROMPT_LEN)
    with SnapshotStore.open(folder / "restore-int8", mode="r", cache_bytes=2**28) as store:
        for label, kwargs in (("without model", {}), ("with model", {"model": model})):
            store.read_prefix("bench", "t0", 256, **kwargs)
            start = time.perf_counter()
            for _ in range(8):
                store.read_prefix("bench", "t0", 256, **kwargs)
            out[f"8 warm 256-token reads, {label}"] = {"ms": (time.perf_counter() - start) * 1e3}
            log(f"8 warm 256-token reads {label}: {(time.perf_counter() - start) * 1e3:.1f} ms")
    for codec, cache_bytes, on_device, k in variants:
        with SnapshotStore.open(folder / f"restore-{codec}", mode="r", cache_bytes=cache_bytes) as store:

            def restore(store=store, on_device=on_device, k=k):
                got = store.read_prefix("bench", "t0", prefix, model=model, on_device=on_device)
                cache = cache_from_states(model, [got], max_length=prefix + 64, repeats=k)
                return jax.block_until_ready(cache.views[-1].value)

            def prefill():
                cache = model.init_cache(batch_size=1, max_length=prefix + 64)
                return jax.block_until_ready(forward_chunk(model, cache, ids[:, :prefix], split=split)[0])

            restore(), prefill()  # compile both, warm the chunk cache
            times = {"restore": [], "prefill": [], "back_to_back": []}
            for _ in range(rounds):
                for label, fn in (("restore", restore), ("prefill", prefill)):
                    start = time.perf_counter()
                    fn()
                    times[label].append(time.perf_counter() - start)
            for _ in range(rounds):  # restores in a row: no heavy XLA work just before
                start = time.perf_counter()
                restore()
                times["back_to_back"].append(time.perf_counter() - start)
        r, p = statistics.median(times["restore"]), statistics.median(times["prefill"])
        b = statistics.median(times["back_to_back"])
        where = "device" if on_device else "host"
        label = f"{codec}, K={k}, chunk cache {'on' if cache_bytes else 'off'}, decode on {where}"
        out[label] = {
            "restore_ms": r * 1e3,
            "prefill_ms": p * 1e3,
            "restore_over_prefill": r / p,
            "back_to_back_restore_ms": b * 1e3,
            "back_to_back_over_prefill": b / p,
        }
        log(f"restore {label}: {r * 1e3:.1f} ms ({b * 1e3:.1f} in a row) vs prefill {p * 1e3:.0f} ms (1/{p / r:.0f})")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=16, help="trajectories spilled per measurement")
    parser.add_argument("--length", type=int, default=1024, help="tokens per trajectory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--problems", type=int, default=120, help="task problems whose KV feeds the stream")
    parser.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/store.json"))
    parser.add_argument("--plot", default=str(REPO / "docs/img/store_bench.png"))
    args = parser.parse_args()
    enable_compilation_cache()
    quiet_logs()

    stream = task_kv_stream(args.problems)
    log(f"task KV stream: {stream[0].shape[1]} tokens of the warm-up policy")
    layout = dataclasses.replace(
        kv_layout(build_model("qwen2", dataclasses.replace(QWEN2_0P5B_KV, hidden_size=128, intermediate_size=128))),
        dtype="bfloat16",
    )
    ids = np.random.default_rng(0).integers(0, 256, (1, args.length)).astype(np.int32)
    states = []
    for i in range(args.trajectories):
        keys, values = qwen_shaped(stream, i, args.length, layout)
        states.append(CachedState(keys[:, None], values[:, None], ids, layout, "task" * 8))
    device_kvs = [(jnp.asarray(s.keys[:, 0]), jnp.asarray(s.values[:, 0])) for s in states]
    raw_bytes = sum(s.nbytes for s in states)
    log(f"{args.trajectories} trajectories, {raw_bytes / 2**20:.1f} MiB of raw bf16 KV")

    scratch = Path(tempfile.mkdtemp(prefix="vinekv-bench-", dir=args.dir))
    log("warm-up: compile the device kernels for these shapes (not timed)")
    for _, spec, how, durability in SPILLS:
        store_write(scratch / "warmup", spec, how, durability, states[:1], device_kvs)
        shutil.rmtree(scratch / "warmup")
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "trajectories": args.trajectories,
        "length": args.length,
        "raw_MiB": raw_bytes / 2**20,
    }
    writes: dict[str, list[float]] = {"numpy": []}
    reads: dict[str, dict[int, list[float]]] = {}
    sizes: dict[str, int] = {}
    prefixes = [t for t in (256, 512, 1024) if t <= args.length]
    for rnd in range(args.rounds):
        log(f"round {rnd + 1}/{args.rounds}: writes")
        base = scratch / f"numpy{rnd}"
        base.mkdir()
        writes["numpy"].append(numpy_write(base, states))
        for label, spec, how, durability in SPILLS:
            path = scratch / f"{label.replace(' ', '_')}-{rnd}"
            writes.setdefault(label, []).append(store_write(path, spec, how, durability, states, device_kvs))
            sizes[label] = sum(f.stat().st_size for f in (path / "runs").rglob("*") if f.is_file())
        log(f"round {rnd + 1}/{args.rounds}: reads")
        for t in prefixes:
            numpy_read(base, states, t)
            reads.setdefault("numpy", {}).setdefault(t, []).append(numpy_read(base, states, t))
        for label, spec, _, _ in SPILLS:
            one_per_codec = ("lossless host", "int8 codes flush", "int8-zstd0 codes flush", "int4 codes flush")
            if label not in (*one_per_codec, "int4-hadamard codes flush"):
                continue  # one store per codec (the same bytes as the other stores of that codec)
            path = scratch / f"{label.replace(' ', '_')}-{rnd}"
            zstd = "-zstd0" if spec.get("zstd_level") == 0 else ""
            for cache_bytes, how in ((0, "host"), (2**30, "host"), (2**30, "device"), (0, "codes"), (2**30, "codes")):
                name = f"{spec['name']}{zstd}, cache {'on' if cache_bytes else 'off'}, {how}"
                with SnapshotStore.open(path, mode="r", cache_bytes=cache_bytes) as store:
                    for t in prefixes:
                        store_read(store, len(states), t, how)  # page cache (and chunk cache) warm
                        reads.setdefault(name, {}).setdefault(t, []).append(store_read(store, len(states), t, how))
        for path in scratch.iterdir():
            shutil.rmtree(path)
    med = statistics.median
    results["spill"] = {
        label: {
            "MBps": raw_bytes / 2**20 / med(times),
            "vs_numpy": med(writes["numpy"]) / med(times),
            **({"size_vs_raw_bf16": raw_bytes / sizes[label]} if label in sizes else {}),
        }
        for label, times in writes.items()
    }
    per_token = raw_bytes / args.trajectories / args.length
    results["read"] = {
        name: {
            f"t{t}": {
                "MBps": per_token * t * args.trajectories / 2**20 / med(times[t]),
                "vs_numpy": med(reads["numpy"][t]) / med(times[t]),
            }
            for t in prefixes
        }
        for name, times in reads.items()
    }
    log("restore a 512-token prefix vs re-prefill (Qwen2-0.5B-shaped, bf16 weights)")
    results["restore"] = restore_vs_prefill(states, scratch, args.rounds, prefix=min(512, args.length))
    shutil.rmtree(scratch)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    plot(results, Path(args.plot), prefixes)
    log(f"wrote {args.out} and {args.plot}")
    return 0


def plot(results: dict, path: Path, prefixes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    spill = {k: v for k, v in results["spill"].items() if k != "numpy"}
    axes[0].bar(list(spill), [v["vs_numpy"] for v in spill.values()], color="tab:blue")
    axes[0].axhline(1.0, color="k", ls="--", lw=1)
    axes[0].set_title("spill / numpy write+fsync of raw bf16 (target >= 1.0 for int8)")
    reads = {k: v for k, v in results["read"].items() if k != "numpy"}
    width = 0.8 / len(prefixes)
    for j, t in enumerate(prefixes):
        axes[1].bar(
            np.arange(len(reads)) + j * width, [v[f"t{t}"]["vs_numpy"] for v in reads.values()], width, label=f"t={t}"
        )
    axes[1].axhline(0.5, color="k", ls="--", lw=1)
    axes[1].set_xticks(np.arange(len(reads)) + width, list(reads))
    axes[1].set_title("warm prefix read + decode / numpy read (target >= 0.5)")
    axes[1].legend()
    restore = {k: v for k, v in results["restore"].items() if "restore_over_prefill" in v}
    x = np.arange(len(restore))
    axes[2].bar(x - 0.2, [1 / v["restore_over_prefill"] for v in restore.values()], 0.4, label="right after a prefill")
    axes[2].bar(x + 0.2, [1 / v["back_to_back_over_prefill"] for v in restore.values()], 0.4, label="in a row")
    axes[2].set_xticks(x, list(restore))
    axes[2].axhline(100, color="k", ls="--", lw=1)
    axes[2].set_title("re-prefill 512 tokens / restore (read + inject) (target >= 100)")
    axes[2].legend()
    for ax in axes:
        ax.tick_params(axis="x", rotation=60, labelsize=7)
        ax.title.set_fontsize(9)
    fig.suptitle(
        f"vinekv store: {results['trajectories']} x {results['length']} tokens, Qwen2-0.5B KV geometry with the "
        f"task model's KV; {results['machine']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
