"""Snapshot store benchmark: spill/read throughput vs plain numpy files, stored size, codec cost
and quality, on a Qwen2-0.5B-shaped random model (24 layers, 2 kv heads, head_dim 64, bf16 KV).

    .venv/bin/python benchmarks/store_bench.py [--trajectories 16] [--length 1024]

Every comparison is measured side by side in one process: each round times the numpy baseline
and each store configuration in turn, and the median over rounds is reported. Reads are timed
cold (page cache dropped, where permitted) and warm. Results go to
benchmarks/results/store.json and a plot to docs/img/store_bench.png.
"""

from __future__ import annotations

import argparse
import functools
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
import numpy as np  # noqa: E402

from kvstore import CachedState, SnapshotStore, capture_state, get_codec, resume_from_state  # noqa: E402
from vinekv.models import QWEN2_0P5B_KV, TINY, build_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CODECS = [("lossless", 1), ("lossless", 3), ("lossless", 9), ("int8", 0), ("int8", 1), ("int8", 3), ("int8", 9)]
PROMPT_LEN = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def drop_page_cache() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def capture_trajectories(shape, count: int, length: int, seed: int) -> tuple[object, np.ndarray, list[CachedState]]:
    model = build_model("qwen2", shape, dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, seed=seed)
    ids = np.random.default_rng(seed).integers(0, 256, size=(count, length + 1)).astype(np.int32)
    batch = capture_state(model, ids, length)
    return model, ids, [batch.select(i) for i in range(count)]


def numpy_write(folder: Path, states: list[CachedState]) -> float:
    """Writes each trajectory's raw keys then values to its own file with fsync; returns seconds."""
    start = time.perf_counter()
    for i, state in enumerate(states):
        with open(folder / f"traj{i}.bin", "wb") as fh:
            state.keys.view(np.uint16).tofile(fh)
            state.values.view(np.uint16).tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())
    return time.perf_counter() - start


def numpy_read(folder: Path, states: list[CachedState], t: int) -> float:
    """Reads the raw bytes of positions [0, t) of every trajectory back with numpy (memmap + copy)."""
    shape = (2, *states[0].keys.shape)
    start = time.perf_counter()
    for i in range(len(states)):
        raw = np.memmap(folder / f"traj{i}.bin", dtype=np.uint16, mode="r", shape=shape)
        np.array(raw[:, :, :, :t])
    return time.perf_counter() - start


def store_write(path: Path, codec: str, level: int, states: list[CachedState]) -> float:
    """Seconds from the first spill until every trajectory is committed (store already open)."""
    with SnapshotStore.open(path, mode="w-", codec={"name": codec, "zstd_level": level}) as store:
        start = time.perf_counter()
        for i, state in enumerate(states):
            store.spill("bench", f"traj{i:03d}", state, PROMPT_LEN)
        store.flush()
        return time.perf_counter() - start


def store_read(store: SnapshotStore, count: int, t: int) -> float:
    start = time.perf_counter()
    store.read_prefixes([("bench", f"traj{i:03d}", t) for i in range(count)])
    return time.perf_counter() - start


def codec_cost(state: CachedState, codec: str) -> dict[str, float]:
    """Seconds per raw MB of the codec's numpy encode/decode (zstd runs inside TensorStore)."""
    impl = get_codec(codec)
    keys, values = state.keys[:, 0], state.values[:, 0]
    impl.decode({n: a.data for n, a in impl.encode(keys, values).items()}, str(keys.dtype), keys.dtype)  # compile
    start = time.perf_counter()
    arrays = {name: a.data for name, a in impl.encode(keys, values).items()}
    enc = time.perf_counter() - start
    start = time.perf_counter()
    impl.decode(arrays, str(keys.dtype), keys.dtype)
    dec = time.perf_counter() - start
    mb = state.nbytes / 2**20
    return {"encode_ms_per_MB": 1e3 * enc / mb, "decode_ms_per_MB": 1e3 * dec / mb}


def quality(model, ids: np.ndarray, states: list[CachedState], folder: Path) -> dict[str, dict[str, float]]:
    """Reconstruction error and next-token KL of resuming from decoded vs exact KV, per codec."""
    length = states[0].position
    out = {}
    for codec in ("lossless", "int8"):
        path = folder / f"quality-{codec}"
        with SnapshotStore.open(path, mode="w-", codec=codec) as store:
            for i, state in enumerate(states):
                store.spill("q", f"t{i}", state, PROMPT_LEN)
            store.flush()
            decoded = store.read_prefixes([("q", f"t{i}", length) for i in range(len(states))], model=model)
        errs, kls = [], []
        for i, (exact, got) in enumerate(zip(states, decoded, strict=True)):
            for a, b in ((exact.keys, got.keys), (exact.values, got.values)):
                errs.append(np.abs(a.astype(np.float32) - b.astype(np.float32)))
            ref, _ = resume_from_state(model, exact, ids[i : i + 1, length : length + 1])
            lossy, _ = resume_from_state(model, got, ids[i : i + 1, length : length + 1])
            p = jax.nn.log_softmax(ref[0, -1].astype(jnp.float32))
            q = jax.nn.log_softmax(lossy[0, -1].astype(jnp.float32))
            kls.append(float((jnp.exp(p) * (p - q)).sum()))
        err = np.concatenate([e.ravel() for e in errs])
        out[codec] = {
            "max_abs_err": float(err.max()),
            "mean_abs_err": float(err.mean()),
            "kl_mean": float(np.mean(kls)),
            "kl_max": float(np.max(kls)),
        }
        shutil.rmtree(path)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=16, help="trajectories spilled per measurement")
    parser.add_argument("--length", type=int, default=1024, help="tokens per trajectory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch folder on the disk to measure (default: a temp dir)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/store.json"))
    parser.add_argument("--plot", default=str(REPO / "docs/img/store_bench.png"))
    args = parser.parse_args()
    enable_compilation_cache(REPO / ".jax_cache")
    quiet_logs()

    log(f"capturing 4 distinct {args.length}-token trajectories on the Qwen2-0.5B-shaped model")
    big_model, big_ids, distinct = capture_trajectories(QWEN2_0P5B_KV, 4, args.length, seed=0)
    states = [distinct[i % 4] for i in range(args.trajectories)]
    raw_bytes = sum(s.nbytes for s in states)
    log(f"{args.trajectories} trajectories, {raw_bytes / 2**20:.1f} MiB of raw bf16 KV")

    scratch = Path(tempfile.mkdtemp(prefix="vinekv-bench-", dir=args.dir))
    log("warm-up: compile the int8 kernels for these shapes (not timed)")
    store_write(scratch / "warmup", "int8", 1, states[:1])
    with SnapshotStore.open(scratch / "warmup", mode="r") as warm:
        store_read(warm, 1, args.length)
    shutil.rmtree(scratch / "warmup")
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "trajectories": args.trajectories,
        "length": args.length,
        "raw_MiB": raw_bytes / 2**20,
    }
    write_times: dict[str, list[float]] = {"numpy": []}
    read_times: dict[str, dict[int, list[float]]] = {"numpy": {}}
    cold_reads: dict[str, dict[int, list[float]]] = {"numpy": {}}
    sizes: dict[str, int] = {}
    prefixes = [t for t in (256, 512, 1024) if t <= args.length]
    can_drop = drop_page_cache()
    for rnd in range(args.rounds):
        log(f"round {rnd + 1}/{args.rounds}: writes")
        base = scratch / f"numpy{rnd}"
        base.mkdir()
        write_times["numpy"].append(numpy_write(base, states))
        for codec, level in CODECS:
            name = f"{codec}-zstd{level}"
            path = scratch / f"{name}-{rnd}"
            write_times.setdefault(name, []).append(store_write(path, codec, level, states))
            sizes[name] = sum(f.stat().st_size for f in (path / "runs").rglob("*") if f.is_file())
        log(f"round {rnd + 1}/{args.rounds}: reads")
        stores = {f"{c}-zstd{lv}": SnapshotStore.open(scratch / f"{c}-zstd{lv}-{rnd}", mode="r") for c, lv in CODECS}
        for t in prefixes:
            for name in ["numpy", *stores]:
                if name == "numpy":
                    reader = functools.partial(numpy_read, base, states, t)
                else:
                    reader = functools.partial(store_read, stores[name], len(states), t)
                if can_drop:
                    drop_page_cache()
                    cold_reads.setdefault(name, {}).setdefault(t, []).append(reader())
                reader()  # warm the page cache
                read_times.setdefault(name, {}).setdefault(t, []).append(reader())
        for store in stores.values():
            store.close()
    shutil.rmtree(scratch)

    def med(xs):
        return statistics.median(xs)

    per_token_bytes = raw_bytes / args.trajectories / args.length
    table = {}
    for name in write_times:
        entry = {"spill_MBps": raw_bytes / 2**20 / med(write_times[name])}
        entry["spill_vs_numpy"] = med(write_times["numpy"]) / med(write_times[name])
        for t in prefixes:
            nbytes = per_token_bytes * t * args.trajectories / 2**20
            entry[f"read{t}_MBps"] = nbytes / med(read_times[name][t])
            entry[f"read{t}_vs_numpy"] = med(read_times["numpy"][t]) / med(read_times[name][t])
            if can_drop:
                entry[f"cold_read{t}_vs_numpy"] = med(cold_reads["numpy"][t]) / med(cold_reads[name][t])
        if name != "numpy":
            entry["size_vs_raw_bf16"] = raw_bytes / sizes[name]
        table[name] = entry
    results["table"] = table
    results["page_cache_dropped_for_cold_reads"] = can_drop
    results["codec_cpu"] = {c: codec_cost(distinct[0], c) for c in ("lossless", "int8")}

    log("quality: reconstruction error and next-token KL (tiny and 0.5B-shaped)")
    tiny_model, tiny_ids, tiny_states = capture_trajectories(TINY, 4, 256, seed=1)
    scratch = Path(tempfile.mkdtemp(prefix="vinekv-bench-q-", dir=args.dir))
    results["quality"] = {
        "tiny (2 layers, 2 kv heads, head_dim 16), 256 tokens": quality(tiny_model, tiny_ids, tiny_states, scratch),
        f"qwen2-0.5B-shaped, {args.length} tokens": quality(big_model, big_ids, distinct, scratch),
    }
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

    table = results["table"]
    names = [n for n in table if n != "numpy"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].bar(names, [table[n]["spill_vs_numpy"] for n in names], color="tab:blue")
    axes[0].axhline(1.0, color="k", ls="--", lw=1)
    axes[0].set_title("spill throughput / numpy write+fsync (target >= 1.0 for int8)")
    width = 0.8 / len(prefixes)
    for j, t in enumerate(prefixes):
        axes[1].bar(
            np.arange(len(names)) + j * width, [table[n][f"read{t}_vs_numpy"] for n in names], width, label=f"t={t}"
        )
    axes[1].axhline(0.5, color="k", ls="--", lw=1)
    axes[1].set_xticks(np.arange(len(names)) + width, names)
    axes[1].set_title("prefix read throughput / numpy read (warm; target >= 0.5)")
    axes[1].legend()
    axes[2].bar(names, [table[n]["size_vs_raw_bf16"] for n in names], color="tab:green")
    axes[2].axhline(2.3, color="k", ls="--", lw=1)
    axes[2].set_title("raw bf16 bytes / stored bytes (target >= 2.3 for int8)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=45)
        ax.title.set_fontsize(9)
    fig.suptitle(
        f"vinekv snapshot store, {results['trajectories']} x {results['length']}-token trajectories, "
        f"Qwen2-0.5B KV shape; {results['machine']}",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
