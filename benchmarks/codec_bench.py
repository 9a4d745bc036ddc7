"""Codecs as RL sees them: stored size, next-token KL, MC values and advantage signs vs lossless.

    cd benchmarks && PYTHONPATH=.. ../.venv/bin/python codec_bench.py [--problems 60] [--k 9]

The KV is the arithmetic task's warmed-up policy's (the cached `warm_up`; 2 layers, 2 KV heads,
head_dim 32), on one sampled response per held-out problem (seed 777), sampled like a rollout
of the training job (`value_quality_bench.sample_responses`).

1. Size: every trajectory's KV, cast to bfloat16, is spilled into one store per codec;
   reported is raw bf16 bytes / stored bytes, of the chunk data (the shard files: codes,
   parameters, shard indexes) and of all files (`SnapshotStore.size`, which adds each node's
   metadata: token ids, fields; large next to 48-token trajectories). Prompts count once.
2. Next-token KL (nats) KL(p_exact || p_codec) of the policy resumed from the decoded KV vs
   the exact KV (float32, read back from the store), as a branch starts: the prefix's KV from
   the store and its last token run fresh. At three sets of positions: every step start (the
   states replay branches from), every response token, and after the response's last token
   (past EOS: outside what the policy was trained on).
3. MC values and advantages: the float32-KV stores are replayed by `replay_run` with the
   training job's branch settings, K = --k branches, the same branch keys for every store; a
   state agrees when |V_codec - V_lossless| <= the larger of its two standard errors. From the
   values, VinePPO's step advantages (`trajectory_advantages`, the response's own reward at
   its end) and the trainer's whitened token advantages over the whole batch
   (`normalize_batch`): the share whose sign is the opposite of lossless's. Reference: the
   lossless store replayed with other branch keys (seed + 1), i.e. what MC noise alone flips.

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
from typing import Any

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from value_quality_bench import RUN, codec_agreement, replay, replay_config, sample_responses  # noqa: E402

from vinekv.kvstore import CachedState, SnapshotStore, capture_sequences  # noqa: E402
from vinekv.kvstore.dense_cache import cache_from_states, forward_chunk  # noqa: E402
from vinekv.replay import MCRecord  # noqa: E402
from vinekv.trainer.advantages import normalize_batch, trajectory_advantages, vineppo_advantages  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CODECS = {
    "lossless": {"name": "lossless"},
    "int8": {"name": "int8"},
    "int4-g32": {"name": "int4", "group_size": 32},
    "int4-hadamard": {"name": "int4-hadamard"},
}
RESAMPLED = "lossless, other branch keys"
KL_ROWS = 64  # rows per forward of the KL measurement (one compiled shape)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- next-token distributions ------------------------------------------------------------------


def next_token_log_probs(model: Any, prefixes: list[CachedState], last_ids: np.ndarray, max_length: int) -> np.ndarray:
    """``[N, vocab]`` float32 log-probabilities of the token after each prefix's KV followed by
    its ``last_ids[i]`` (the way a branch starts: the stored KV, then one fresh token)."""
    out = []
    for lo in range(0, len(prefixes), KL_ROWS):
        chunk = prefixes[lo : lo + KL_ROWS]
        ids = np.asarray(last_ids[lo : lo + KL_ROWS], np.int32)
        pad = KL_ROWS - len(chunk)
        cache = cache_from_states(model, chunk + [chunk[0]] * pad, max_length=max_length)
        logits, _ = forward_chunk(model, cache, np.concatenate([ids, np.repeat(ids[:1], pad)])[:, None])
        out.append(np.asarray(jax.nn.log_softmax(logits[: len(chunk), -1].astype(jnp.float32), axis=-1)))
    return np.concatenate(out)


def kl(p_log: np.ndarray, q_log: np.ndarray) -> np.ndarray:
    """``[N]`` KL(p || q) in nats of rows of log-probabilities ``[N, vocab]``."""
    return np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)


def kl_summary(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "p99": float(np.quantile(values, 0.99)), "max": float(values.max())}


# -- advantages --------------------------------------------------------------------------------


def opposite_share(a: np.ndarray, b: np.ndarray) -> float:
    """Share of entries whose signs are strictly opposite (one > 0, the other < 0)."""
    return float(np.mean(np.sign(a) * np.sign(b) < 0))


def advantages(
    records: dict[str, MCRecord], rewards: dict[str, float], lengths: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(``[steps]`` VinePPO step advantages of every trajectory in id order, ``[tokens]`` the
    trainer's whitened token advantages of the same batch, response tokens only); ``rewards``
    and ``lengths`` (response tokens) per trajectory id."""
    steps, rows = [], []
    for tid in sorted(records):
        record, reward = records[tid], rewards[tid]
        values = record.stats.mean
        at_end = np.zeros(len(values))
        at_end[-1] = reward
        steps.append(vineppo_advantages(values, at_end))
        rows.append(trajectory_advantages("full", lengths[tid], record.response_positions, values, reward))
    width = max(len(r) for r in rows)
    mask = np.array([[t < len(r) for t in range(width)] for r in rows])
    tokens = np.stack([np.pad(r, (0, width - len(r))) for r in rows])
    return np.concatenate(steps), normalize_batch(tokens, mask, whiten_advantages=True)[mask]


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
    rewards = {
        t.tid: reward([""], [tokenizer.decode(t.response.tolist(), skip_special_tokens=True)], [t.answer])[0]
        for t in trajectories
    }
    lengths = {t.tid: len(t.response) for t in trajectories}
    log(
        f"{len(trajectories)} responses, {np.mean([s.position for s in states]):.1f} tokens on average, "
        f"{np.mean(list(rewards.values())):.2f} solved"
    )
    max_length = max(s.position for s in states) + 1
    results = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, CPU only",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": "arithmetic warm-up policy (2 layers, 2 kv heads, head_dim 32)",
        "k": args.k,
        "codecs": {},
    }
    records: dict[str, dict[str, MCRecord]] = {}
    signs: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # store -> (step, whitened token) advantages
    exact: dict[str, np.ndarray] = {}  # position set -> exact log-probs
    with tempfile.TemporaryDirectory(prefix="vinekv-codecs-") as scratch:
        for index, (name, spec) in enumerate([*CODECS.items(), (RESAMPLED, CODECS["lossless"])]):
            f32 = SnapshotStore.open(Path(scratch) / f"{index}-f32", codec=spec)
            for traj, state in zip(trajectories, states, strict=True):
                f32.spill(RUN, traj.tid, state, len(traj.prompt), answer=traj.answer)
            f32.flush()
            settings = argparse.Namespace(**{**vars(args), "seed": args.seed + (name == RESAMPLED)})
            records[name] = replay(f32, model, tokenizer, reward, replay_config(settings, args.k))
            signs[name] = advantages(records[name], rewards, lengths)
            entry: dict[str, Any] = {}
            if name != RESAMPLED:
                entry = size_entry(Path(scratch) / f"{index}-bf16", spec, trajectories, states)
                entry["kl"] = kl_entry(model, f32, trajectories, states, records["lossless"], max_length, exact)
            if name != "lossless":
                agreement = codec_agreement(records[name], records["lossless"], args.k)
                entry["mc"] = {k: v for k, v in agreement.items() if k != "per_state"}
                (step_adv, token_adv), (ref_steps, ref_tokens) = signs[name], signs["lossless"]
                entry["advantages"] = {
                    "steps": int(step_adv.size),
                    "tokens": int(token_adv.size),
                    "step_opposite_sign": opposite_share(step_adv, ref_steps),
                    "step_sign_changed": float(np.mean(np.sign(step_adv) != np.sign(ref_steps))),
                    "token_opposite_sign_whitened": opposite_share(token_adv, ref_tokens),
                    "step_mean_abs_diff": float(np.abs(step_adv - ref_steps).mean()),
                }
            results["codecs"][name] = entry
            log(f"{name}: {json.dumps(entry)}")
            f32.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


def size_entry(path: Path, spec: dict[str, Any], trajectories: list, states: list[CachedState]) -> dict[str, Any]:
    """Sizes of the bfloat16-cast KV spilled with ``spec`` into a new store at ``path``: raw bf16
    over shard files and all files."""
    with SnapshotStore.open(path, codec=spec) as bf16:
        for traj, state in zip(trajectories, states, strict=True):
            cast = dataclasses.replace(
                state,
                keys=state.keys.astype(ml_dtypes.bfloat16),
                values=state.values.astype(ml_dtypes.bfloat16),
                layout=dataclasses.replace(state.layout, dtype="bfloat16"),
            )
            bf16.spill(RUN, traj.tid, cast, len(traj.prompt))
        bf16.flush()
        size = bf16.size(RUN)
    runs = path / "runs"
    shards = sum(f.stat().st_size for f in runs.rglob("*") if f.is_file() and "c" in f.relative_to(runs).parts)
    return {
        "raw_bf16_bytes": size.raw,
        "stored_bytes": size.stored,
        "shard_bytes": shards,
        "size_vs_raw_bf16": size.raw / shards,
        "size_vs_raw_bf16_all_files": size.ratio,
    }


def kl_entry(
    model: Any,
    store: SnapshotStore,
    trajectories: list,
    states: list[CachedState],
    lossless: dict[str, MCRecord],
    max_length: int,
    exact: dict[str, np.ndarray],
) -> dict[str, Any]:
    """Next-token KL of the store's decoded KV vs the exact KV at step starts, every response
    token, and after the last token; ``exact`` caches the exact log-probs across codecs."""
    sets: dict[str, list[tuple[int, int]]] = {"step_starts": [], "response_tokens": [], "after_last_token": []}
    for i, traj in enumerate(trajectories):
        n, plen = states[i].position, len(traj.prompt)
        sets["step_starts"] += [(i, int(p)) for p in lossless[traj.tid].positions]
        sets["response_tokens"] += [(i, p) for p in range(plen, n)]
        sets["after_last_token"].append((i, n))
    decoded = [
        store.read_prefix(RUN, t.tid, s.position, model=model) for t, s in zip(trajectories, states, strict=True)
    ]
    entry = {}
    for key, points in sets.items():
        last_ids = np.array([states[i].token_ids[0, p - 1] for i, p in points])
        if key not in exact:
            exact[key] = next_token_log_probs(model, [states[i].prefix(p - 1) for i, p in points], last_ids, max_length)
        got = next_token_log_probs(model, [decoded[i].prefix(p - 1) for i, p in points], last_ids, max_length)
        entry[key] = {"positions": len(points), **kl_summary(kl(exact[key], got))}
    return entry


if __name__ == "__main__":
    sys.exit(main())
