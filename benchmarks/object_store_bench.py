"""Prefix reads from a local store vs the same store on S3 (moto's server on 127.0.0.1).

    PYTHONPATH=. .venv/bin/python benchmarks/object_store_bench.py [--trajectories 16] [--length 1024] [--t 512]

Both stores hold the same int8 trajectories of Qwen2-0.5B's KV geometry (24 layers, 2 KV heads,
head_dim 64, bfloat16; random KV, one shared 128-token prompt). For each store, in one process,
side by side: a fresh handle reads the prefix ``[0, t)`` of every trajectory once (first read:
node and array metadata too), then again (warm: metadata cached, chunk cache off), one at a
time; reported are the median latency, the throughput in raw KV bytes, and TensorStore's
counters per prefix read (``/tensorstore/kvstore/<driver>/read``: reads asked of the driver, one
per stored chunk or metadata file; ``batch_read``: the requests S3 coalesced them into). moto is a local Python
server: absolute S3 figures are a lower bound on a real bucket's latency.

Results: benchmarks/results/object_store.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

from vinekv.kvstore import CachedState, KVLayout, SnapshotStore

LAYOUT = KVLayout(num_layers=24, num_kv_heads=2, head_dim=64, dtype="bfloat16", vocab_size=151936, model_type="qwen2")
PROMPT = 128


def trajectory(n: int, length: int) -> CachedState:
    rng = np.random.default_rng(0)
    kv = rng.standard_normal((2, LAYOUT.num_layers, 1, length, 2, 64), dtype=np.float32)
    kv[:, :, :, PROMPT:] += np.float32(n + 1)
    ids = (np.arange(length, dtype=np.int32) * (n + 3) % 1000)[None]
    ids[0, :PROMPT] = np.arange(PROMPT)
    kv = kv.astype(ml_dtypes.bfloat16)
    return CachedState(kv[0], kv[1], ids, LAYOUT, "ab" * 16)


def counter(driver: str, name: str) -> int:
    """TensorStore's kvstore counter ``name`` (``read``: reads asked of the driver; ``batch_read``:
    the requests they were coalesced into, where the driver batches) for ``driver``."""
    path = f"/tensorstore/kvstore/{driver}/{name}"
    return sum(
        v["value"] for m in ts.experimental_collect_matching_metrics(path) if m["name"] == path for v in m["values"]
    )


def measure(location: str | Path, driver: str, ids: list[str], t: int) -> dict[str, float]:
    out = {}
    with SnapshotStore.open(location, mode="r", cache_bytes=0) as store:
        for phase in ("first", "warm"):
            times, reads, batches = [], counter(driver, "read"), counter(driver, "batch_read")
            for tid in ids:
                start = time.perf_counter()
                store.read_prefix("r", tid, t)
                times.append(time.perf_counter() - start)
            raw = t * 2 * LAYOUT.num_layers * 2 * 64 * 2
            out[f"{phase}_ms"] = round(1000 * statistics.median(times), 2)
            out[f"{phase}_MBps"] = round(raw * len(ids) / sum(times) / 1e6, 1)
            out[f"{phase}_reads_per_prefix"] = round((counter(driver, "read") - reads) / len(ids), 2)
            out[f"{phase}_batched_requests_per_prefix"] = round((counter(driver, "batch_read") - batches) / len(ids), 2)
    return out


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto's server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--t", type=int, default=512, help="prefix length read")
    args = parser.parse_args()
    import boto3

    server, endpoint = start_moto()
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1"
    )
    try:
        boto3.client("s3").create_bucket(Bucket="vinekv-bench")
        ids = [f"t{n:03d}" for n in range(args.trajectories)]
        with tempfile.TemporaryDirectory() as tmp:
            locations = {"file": Path(tmp) / "store", "s3": "s3://vinekv-bench/store"}
            for location in locations.values():
                with SnapshotStore.open(location, codec="int8") as store:
                    for n, tid in enumerate(ids):
                        store.spill("r", tid, trajectory(n, args.length), PROMPT)
            results = {driver: measure(loc, driver, ids, args.t) for driver, loc in locations.items()}
    finally:
        server.kill()
    results["s3_over_file_first"] = round(results["s3"]["first_ms"] / results["file"]["first_ms"], 2)
    results["s3_over_file_warm"] = round(results["s3"]["warm_ms"] / results["file"]["warm_ms"], 2)
    record = {
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/object_store_bench.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "settings": vars(args),
        "results": results,
    }
    print(json.dumps(record, indent=1))
    out = Path(__file__).parent / "results" / "object_store.json"
    out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
