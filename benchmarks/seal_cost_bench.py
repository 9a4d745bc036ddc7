"""What sealing a node's identity and content costs: spill and prefix-read time with the per-chunk
content hashes and the per-read generation check, against the same code with both switched off.

    PYTHONPATH=. .venv/bin/python benchmarks/seal_cost_bench.py [--trajectories 16] [--length 1024] [--rounds 5]

Trajectories of Qwen2-0.5B's KV geometry (24 layers, 2 KV heads, head_dim 64, float32 KV, 6 MiB
per 1024 tokens; random values, so the codecs compress nothing), 64-token chunks, local disk,
``durability="trajectory"``. Per round and codec, side by side in one process, alternating:
"sealed" (this code) and "unsealed" (`chunk_hashes` returning nothing, reads skipping the hash
check and the run-generation read). Timed: spilling every trajectory until committed; reading
every trajectory whole in one `read_prefixes` call; 4 single `read_prefix` calls per trajectory
(prefixes of 1/4 ... 4/4 of its length). Medians over rounds; results in
benchmarks/results/seal_cost.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from vinekv.kvstore import CachedState, KVLayout, SnapshotStore

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = KVLayout(num_layers=24, num_kv_heads=2, head_dim=64, dtype="float32", vocab_size=151936, model_type="qwen2")
PROMPT = 64


def states(count: int, length: int) -> list[CachedState]:
    rng = np.random.default_rng(0)
    shape = (LAYOUT.num_layers, 1, length, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return [
        CachedState(
            rng.standard_normal(shape, dtype=np.float32),
            rng.standard_normal(shape, dtype=np.float32),
            rng.integers(0, LAYOUT.vocab_size, (1, length)).astype(np.int32),
            LAYOUT,
            "ab" * 16,
        )
        for _ in range(count)
    ]


@contextlib.contextmanager
def unsealed():
    """Chunk hashes not computed (nodes record none, so reads check none) and no generation read."""
    import vinekv.kvstore.writes as writes_module
    from vinekv.kvstore.reads import NodeReader, ReadPart

    saved = writes_module.chunk_hashes, NodeReader.forget_changed_runs, ReadPart._check_hashes
    writes_module.chunk_hashes = lambda codes, entries: []
    NodeReader.forget_changed_runs = lambda self, runs: False
    ReadPart._check_hashes = lambda self, name, whole, what: None
    try:
        yield
    finally:
        writes_module.chunk_hashes, NodeReader.forget_changed_runs, ReadPart._check_hashes = saved


def one_round(folder: Path, codec: str, data: list[CachedState], sealed: bool) -> dict[str, float]:
    length = data[0].position
    with contextlib.nullcontext() if sealed else unsealed():
        with SnapshotStore.open(folder, codec=codec, chunk_tokens=64) as store:
            start = time.perf_counter()
            for i, state in enumerate(data):
                store.spill("r", f"t{i}", state, PROMPT)
            store.flush()
            spill = time.perf_counter() - start
        with SnapshotStore.open(folder, mode="r") as store:
            start = time.perf_counter()
            store.read_prefixes([("r", f"t{i}", length) for i in range(len(data))])
            batch = time.perf_counter() - start
            start = time.perf_counter()
            for i in range(len(data)):
                for q in (1, 2, 3, 4):
                    store.read_prefix("r", f"t{i}", length * q // 4)
            single = time.perf_counter() - start
    return {"spill_s": spill, "read_batch_s": batch, "read_single_s": single}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = states(args.trajectories, args.length)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vinekv-seal-") as scratch:
        for codec in ("int8", "lossless"):
            times: dict[str, list[dict[str, float]]] = {"sealed": [], "unsealed": []}
            for r in range(args.rounds):
                for variant in ("sealed", "unsealed") if r % 2 == 0 else ("unsealed", "sealed"):
                    folder = Path(scratch) / f"{codec}-{variant}-{r}"
                    times[variant].append(one_round(folder, codec, data, variant == "sealed"))
            for key in ("spill_s", "read_batch_s", "read_single_s"):
                sealed = float(np.median([t[key] for t in times["sealed"]]))
                plain = float(np.median([t[key] for t in times["unsealed"]]))
                rows.append(
                    {"codec": codec, "measure": key, "sealed": sealed, "unsealed": plain, "ratio": sealed / plain}
                )
                print(f"{codec:>8} {key:>13}: sealed {sealed:.3f} s, unsealed {plain:.3f} s, x{sealed / plain:.3f}")
    out = ROOT / "benchmarks/results/seal_cost.json"
    out.write_text(
        json.dumps(
            {
                "command": "PYTHONPATH=. .venv/bin/python benchmarks/seal_cost_bench.py "
                + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
                "machine": platform.platform(),
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
