"""Codecs on a trained model's KV: stored size, next-token KL and MC values (int8, int4 vs lossless).

    PYTHONPATH=. .venv/bin/python benchmarks/codec_bench.py [--problems 60] [--k 9]

The KV is the arithmetic task's warmed-up policy's (the cached `warm_up`; 2 layers, 2 KV heads,
head_dim 32), on one sampled response per held-out problem (seed 777), sampled like a rollout
of the training job (`value_quality_bench.sample_responses`).

1. Size: every trajectory's KV, cast to bfloat16, is spilled into one store per codec;
   reported is raw bf16 bytes / stored bytes, of the chunk data (the shard files: codes,
   parameters, shard indexes) and of all files (`SnapshotStore.size`, which adds each node's
   metadata: token ids, fields; large next to 48-token trajectories). Prompts count once.
2. Next-token KL (nats) of resuming the policy from the decoded KV vs the exact KV, at the end of
   every trajectory (the model's own float32 KV, read back with `read_prefix`).
3. MC values: the float32-KV stores are replayed by `replay_run` with the training job's branch
   settings, K = --k branches, the same branch keys for every store; a state agrees when
   |V_codec - V_lossless| <= the larger of its two standard errors (sqrt(Var / K)).

Results: benchmarks/results/codecs.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
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
from value_quality_bench import RUN, codec_agreement, replay, replay_config, sample_responses  # noqa: E402

from vinekv.kvstore import SnapshotStore, capture_sequences, resume_from_state  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CODECS = {
    "lossless": {"name": "lossless"},
    "int8": {"name": "int8"},
    "int4-g32": {"name": "int4", "group_size": 32},
    "int4-g8": {"name": "int4", "group_size": 8},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def kl(model, exact, decoded, next_ids) -> float:
    p = jax.nn.log_softmax(resume_from_state(model, exact, next_ids)[0][0, -1].astype(jnp.float32))
    q = jax.nn.log_softmax(resume_from_state(model, decoded, next_ids)[0][0, -1].astype(jnp.float32))
    return float((jnp.exp(p) * (p - q)).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=60)
    parser.add_argument("--problem-seed", type=int, default=777)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--horizon", type=int, default=40)
    parser.add_argument("--k", type=int, default=9, help="branches per state for the MC comparison (default 9)")
    parser.add_argument("--max-rows", type=int, default=256)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/codecs.json"))
    args = parser.parse_args()
    enable_compilation_cache()
    quiet_logs()
    from vinekv.tasks.arithmetic import make_dataset, reward
    from vinekv.tasks.warmup import WarmupConfig, warm_up

    warmup = WarmupConfig()
    policy = warm_up(warmup)
    model, tokenizer = policy.model, policy.tokenizer
    data = make_dataset(args.problems, args.problem_seed, warmup.task_steps, warmup.operand_max)
    trajectories = sample_responses(model, tokenizer, data, replay_config(args, 1))
    states = list(capture_sequences(model, [t.tokens for t in trajectories], batch_rows=16))
    log(f"{len(trajectories)} responses, {np.mean([s.position for s in states]):.1f} tokens on average")
    results = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, CPU only",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": "arithmetic warm-up policy (2 layers, 2 kv heads, head_dim 32)",
        "k": args.k,
        "codecs": {},
    }
    records = {}
    with tempfile.TemporaryDirectory(prefix="vinekv-codecs-") as scratch:
        for name, spec in CODECS.items():
            bf16 = SnapshotStore.open(Path(scratch) / f"{name}-bf16", codec=spec)
            f32 = SnapshotStore.open(Path(scratch) / f"{name}-f32", codec=spec)
            for traj, state in zip(trajectories, states, strict=True):
                cast = dataclasses.replace(
                    state,
                    keys=state.keys.astype(ml_dtypes.bfloat16),
                    values=state.values.astype(ml_dtypes.bfloat16),
                    layout=dataclasses.replace(state.layout, dtype="bfloat16"),
                )
                bf16.spill(RUN, traj.tid, cast, len(traj.prompt))
                f32.spill(RUN, traj.tid, state, len(traj.prompt), answer=traj.answer)
            bf16.flush()
            f32.flush()
            size = bf16.size(RUN)
            runs = Path(scratch) / f"{name}-bf16/runs"
            shards = sum(f.stat().st_size for f in runs.rglob("*") if f.is_file() and "c" in f.relative_to(runs).parts)
            kls, errs = [], []
            for traj, state in zip(trajectories, states, strict=True):
                got = f32.read_prefix(RUN, traj.tid, state.position - 1, model=model)
                exact = state.prefix(state.position - 1)
                kls.append(kl(model, exact, got, state.token_ids[:, -1:]))
                errs.append(np.abs(np.asarray(got.keys) - exact.keys).max())
            records[name] = replay(f32, model, tokenizer, reward, replay_config(args, args.k))
            entry = {
                "raw_bf16_bytes": size.raw,
                "stored_bytes": size.stored,
                "shard_bytes": shards,
                "size_vs_raw_bf16": size.raw / shards,
                "size_vs_raw_bf16_all_files": size.ratio,
                "kl_mean": float(np.mean(kls)),
                "kl_max": float(np.max(kls)),
                "key_max_abs_err": float(np.max(errs)),
            }
            if name != "lossless":
                agreement = codec_agreement(records[name], records["lossless"], args.k)
                entry["mc"] = {k: v for k, v in agreement.items() if k != "per_state"}
            results["codecs"][name] = entry
            log(f"{name}: {json.dumps({k: v for k, v in entry.items()})}")
            bf16.close()
            f32.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
