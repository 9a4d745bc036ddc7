"""Value quality of Monte-Carlo estimates on the arithmetic task (the VinePPO paper's analysis).

    PYTHONPATH=. .venv/bin/python benchmarks/value_quality_bench.py [--problems 60] [--rank-states 80]
    PYTHONPATH=. .venv/bin/python benchmarks/value_quality_bench.py --policy ppo [--ppo-updates 60]

The policy is the cached warm-up (``--policy warmup``) or, with ``--policy ppo``, the warm-up
after ``--ppo-updates`` updates of the PPO baseline in the comparison's regime (`vinekv.compare`,
method ``ppo``, seed ``--ppo-seed``): then every response, branch and truth below samples that
policy, and its critic (`vinekv.trainer.ppo_baseline.critic_values`) is measured beside the MC estimates
on the same states and alternatives.

Held-out problems (seed 777; the warm-up trains on seed 0, the training job uses 1 and 12345)
get one response each from the policy, sampled like a rollout of the training
job: T = 1, top-p 1, top-k 0, at most 40 tokens, ending at the task's EOS. Each response is
split into steps at "\\n" (`trajectory_states`, full mode) and its states are the step starts.
Every branch samples like a rollout too: a branch from response position b gets 40 - b tokens
(the job's ``max_completion_length`` horizon) and a branch cut off there returns 0.

1. MC error vs K: the responses are spilled into a lossless and an int8 snapshot store and
   valued by `replay_run`. On the lossless store, branches 0..255 of a state give the truth
   V*(s); branches 256..256+M-1 (M = --extra-branches, disjoint from the truth) are split into
   M // K disjoint groups of K, each one K-estimate. MAE(K) = mean over states and groups of
   |V_K - V*|, next to (a) the bound E|p_K - p| <= sqrt(p (1 - p) / K) (Jensen) averaged over
   states with p = V*, (b) the exact E|Binomial(K, p) / K - p| and (c) the exact expected error
   against a 256-branch truth, E|Binomial(K, p) / K - Binomial(256, p) / 256|.
2. Ranking accuracy: from held-out states, --alternatives next steps are sampled (up to the
   next "\\n"); the distinct ones that end a step with budget left are captured and valued
   with 256 branches (truth) and M more (K-estimates, as above). Accuracy = share of pairs of
   alternatives with different true values that a K-estimate orders like the truth (ties in
   the estimate count half), next to the exact binomial prediction with p = V*. The critic is
   scored the same way on V at the state after each alternative step (one estimate, no groups).
3. int8 vs lossless: both stores are replayed with the same settings and branch keys
   (K = --compare-k); a state agrees when |V_int8 - V_lossless| <= the larger of its two
   standard errors (sqrt(Var / K), `mc_values`); the pooled sqrt(se_a^2 + se_b^2) is reported too.

Results: benchmarks/results/value_quality[-ppo].json and docs/img/value-quality[-ppo].png.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from vinekv.kvstore import SnapshotStore, capture_sequences  # noqa: E402
from vinekv.replay import MCRecord, ReplayConfig, generate_branches, mc_values, replay_run, select_states  # noqa: E402
from vinekv.replay.branch_replay import TrajectoryPlan, ValueRequest, value_trajectories  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RUN = "heldout"
CAPTURE_ROWS = 16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One held-out problem and its sampled response.

    Attributes:
      tid: trajectory id in the stores.
      prompt: ``[P]`` int32 prompt tokens.
      response: ``[T]`` int32 response tokens (its EOS included when the policy ended in time).
      answer: the gold answer (the reward's ``answer`` field).
    """

    tid: str
    prompt: np.ndarray
    response: np.ndarray
    answer: str

    @property
    def tokens(self) -> np.ndarray:
        """``[P + T]`` int32: prompt then response."""
        return np.concatenate([self.prompt, self.response]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Alternative:
    """An alternative next step sampled from state ``(tid, position)``.

    Attributes:
      tid, position: the state it was sampled from (response tokens before it).
      response: ``[position + len(step)]`` int32, the response prefix ending with the new step.
      answer: the gold answer.
    """

    tid: str
    position: int
    response: np.ndarray
    answer: str


# -- sampling and valuing through the package ---------------------------------------------------


def replay_config(args: argparse.Namespace, branches: int) -> ReplayConfig:
    """Branch settings of the training job: full mode, T = 1, horizon = max_completion_length,
    unfinished branches return 0; only ``branches`` (a count field) varies between calls."""
    return ReplayConfig(
        mode="full",
        branches=branches,
        max_tokens=args.horizon,
        horizon=args.horizon,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        unfinished_reward=0.0,
        seed=args.seed,
        max_rows=args.max_rows,
    )


def sample_responses(model: Any, tokenizer: Any, data: Any, config: ReplayConfig) -> list[Trajectory]:
    """One rollout per problem: a single branch of ``config.horizon`` tokens from the prompt's
    snapshot (`generate_branches`, the rollouts' sampling settings)."""
    prompts = [np.asarray(tokenizer.encode(p, add_special_tokens=False), np.int32) for p in data["prompt"]]
    states = list(capture_sequences(model, prompts, batch_rows=CAPTURE_ROWS))
    tids = [f"p{i:03d}" for i in range(len(prompts))]
    branches = generate_branches(
        model,
        states,
        config.sampling_params(1),
        engine=config.engine,
        seed=config.seed,
        tokenizer=tokenizer,
        state_keys=[(f"rollout-{t}", 0) for t in tids],
        max_rows=config.max_rows,
        sampler=config.sampler,
    )
    return [
        Trajectory(t, p, b.tokens[0].astype(np.int32), str(a))
        for t, p, b, a in zip(tids, prompts, branches, data["answer"], strict=True)
    ]


def spill(path: Path, codec: str, trajectories: list[Trajectory], model: Any) -> SnapshotStore:
    """Opens a store with ``codec`` at ``path`` and spills every trajectory (prompt + response KV,
    ``answer`` field), as the trainer's ``disk`` strategy does."""
    store = SnapshotStore.open(path, mode="a", codec=codec)
    states = capture_sequences(model, [t.tokens for t in trajectories], batch_rows=CAPTURE_ROWS)
    for traj, state in zip(trajectories, states, strict=True):
        store.spill(RUN, traj.tid, state, len(traj.prompt), answer=traj.answer)
    store.flush()
    return store


def replay(store: SnapshotStore, model: Any, tokenizer: Any, reward: Any, config: ReplayConfig) -> dict[str, MCRecord]:
    """`replay_run` of the stored run (only the branches each state lacks); returns its records."""
    replay_run(store, RUN, model, tokenizer, reward, config)
    return {tid: MCRecord.of(store.trajectory(RUN, tid)) for tid in store.trajectories(RUN)}


def record_returns(records: dict[str, MCRecord], n: int) -> tuple[np.ndarray, list[tuple[str, int]]]:
    """``([states, n] float64 returns of branches 0..n-1, [(tid, position)] per state)``, in
    trajectory order."""
    rows, keys = [], []
    for tid, record in sorted(records.items()):
        for position, returns in zip(record.response_positions, record.returns, strict=True):
            if len(returns) < n:
                raise ValueError(f"{tid} state {position}: {len(returns)} branches, need {n}")
            rows.append(returns[:n])
            keys.append((tid, int(position)))
    return np.asarray(rows, np.float64), keys


def sample_alternatives(
    model: Any,
    tokenizer: Any,
    trajectories: list[Trajectory],
    config: ReplayConfig,
    n: int,
) -> tuple[list[list[Alternative]], dict[str, int]]:
    """``n`` next steps from every step start of every response (`select_states`, full mode),
    each ended at the step delimiter's token; per state the distinct ones that end a step with
    budget left are kept (not the EOS, not cut off). Returns them per state, and counts."""
    newline = tokenizer.encode(config.delimiter, add_special_tokens=False)
    step_config = dataclasses.replace(config, stop_token_ids=tuple(newline))
    captured = capture_sequences(model, [t.tokens for t in trajectories], batch_rows=CAPTURE_ROWS)
    full = dict(zip([t.tid for t in trajectories], captured, strict=True))
    states = [(traj, int(b)) for traj in trajectories for b in select_states(traj.response.tolist(), tokenizer, config)]
    positions = np.array([b for _, b in states])
    branches = generate_branches(
        model,
        [full[t.tid].prefix(len(t.prompt) + b) for t, b in states],
        step_config.sampling_params(n),
        engine=config.engine,
        seed=config.seed,
        tokenizer=tokenizer,
        state_keys=[(f"alternative-{t.tid}", b) for t, b in states],
        max_rows=config.max_rows,
        max_tokens=config.branch_budgets(positions),
        sampler=config.sampler,
    )
    counts = {"sampled": 0, "ended_response": 0, "cut_off": 0, "duplicate": 0}
    out = []
    for (traj, b), state_branches in zip(states, branches, strict=True):
        kept: dict[bytes, Alternative] = {}
        for tokens, reason in zip(state_branches.tokens, state_branches.finish_reasons, strict=True):
            counts["sampled"] += 1
            if reason != "stop" or b + len(tokens) >= config.horizon:
                counts["ended_response" if reason == "eos" else "cut_off"] += 1
            elif tokens.tobytes() in kept:
                counts["duplicate"] += 1
            else:
                response = np.concatenate([traj.response[:b], tokens]).astype(np.int32)
                kept[tokens.tobytes()] = Alternative(traj.tid, b, response, traj.answer)
        out.append(list(kept.values()))
    return out, counts


def value_alternative(
    model: Any, tokenizer: Any, reward: Any, args: argparse.Namespace, alt: Alternative, snapshot: Any
) -> np.ndarray:
    """``[truth_k + extra]`` returns of branches from the state after ``alt``'s step: branches
    0..truth_k-1, then truth_k.. as a second round (`value_trajectories` extends the first)."""
    position = len(alt.response)
    plan = TrajectoryPlan(np.array([position]), np.array([True]), ((),))
    returns = plan.prior
    for branches in (args.truth_k, args.truth_k + args.extra_branches):
        plan = TrajectoryPlan(plan.positions, plan.valued, returns)
        request = ValueRequest(alt.response.tolist(), plan, {position: snapshot}, {"answer": alt.answer})
        (values,) = value_trajectories(model, tokenizer, reward, replay_config(args, branches), [request])
        returns = values.returns
    return np.asarray(returns[0], np.float64)


# -- statistics ---------------------------------------------------------------------------------


def binom_pmf(n: int, p: float) -> np.ndarray:
    """``[n + 1]`` Binomial(n, p) probabilities of 0..n successes."""
    if p <= 0.0 or p >= 1.0:
        return np.eye(n + 1)[0 if p <= 0.0 else n]
    k = np.arange(n + 1)
    log_comb = math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k])
    return np.exp(log_comb + k * math.log(p) + (n - k) * math.log1p(-p))


def expected_abs_error(p: float, k: int) -> float:
    """Exact E|X / k - p| for X ~ Binomial(k, p) (the MAE a K-branch MC estimate has)."""
    return float(binom_pmf(k, p) @ np.abs(np.arange(k + 1) / k - p))


def expected_abs_error_vs_truth(p: float, k: int, truth_k: int) -> float:
    """Exact E|X / k - Y / truth_k| for independent X ~ Bin(k, p), Y ~ Bin(truth_k, p): the MAE
    expected against a ``truth_k``-branch truth rather than p itself."""
    diff = np.abs(np.arange(k + 1)[:, None] / k - np.arange(truth_k + 1)[None, :] / truth_k)
    return float(binom_pmf(k, p) @ diff @ binom_pmf(truth_k, p))


def k_estimates(extra: np.ndarray, k: int) -> np.ndarray:
    """``[states, M // k]`` K-branch MC values (`mc_values`) from disjoint groups of the ``[states, M]``
    extra returns."""
    groups = extra.shape[1] // k
    if groups < 1:
        raise ValueError(f"--extra-branches {extra.shape[1]} gives no group of K = {k}")
    flat = extra[:, : groups * k].reshape(-1, k)
    return mc_values(flat).mean.reshape(extra.shape[0], groups)


def mae_by_k(truth: np.ndarray, extra: np.ndarray, ks: list[int], truth_k: int) -> dict[str, dict[str, float]]:
    """MAE of K-estimates against ``truth`` ``[states]`` for each K, with its binomial
    predictions (``bound``: mean of sqrt(p (1 - p) / K); ``exact``: mean of E|p_K - p|;
    ``exact_vs_truth``: mean of E|p_K - p_truth_k|; p = the truth)."""
    out = {}
    for k in ks:
        per_state = np.abs(k_estimates(extra, k) - truth[:, None]).mean(axis=1)
        out[str(k)] = {
            "groups_per_state": extra.shape[1] // k,
            "mae": float(per_state.mean()),
            "mae_stderr": float(per_state.std(ddof=1) / np.sqrt(len(per_state))),
            "bound": float(np.mean(np.sqrt(truth * (1 - truth) / k))),
            "exact": float(np.mean([expected_abs_error(p, k) for p in truth])),
            "exact_vs_truth": float(np.mean([expected_abs_error_vs_truth(p, k, truth_k) for p in truth])),
        }
    return out


def pair_scores(truth: np.ndarray, estimates: np.ndarray) -> list[tuple[float, float]]:
    """Per pair of alternatives with different truths: ``(|truth gap|, accuracy)``, where
    accuracy is the mean over estimate groups of 1 (same order as the truth), 0.5 (tie) or 0.
    ``truth`` ``[A]``, ``estimates`` ``[A, groups]``."""
    out = []
    for i, j in itertools.combinations(range(len(truth)), 2):
        if truth[i] == truth[j]:
            continue
        sign = np.sign(truth[i] - truth[j])
        agree = np.sign(estimates[i] - estimates[j]) * sign
        out.append((abs(truth[i] - truth[j]), float(np.mean(np.where(agree == 0, 0.5, agree > 0)))))
    return out


def predicted_ranking(p_hi: float, p_lo: float, k: int) -> float:
    """Exact P(X_hi > X_lo) + P(X_hi = X_lo) / 2 for X ~ Binomial(k, p): the ranking accuracy
    of K-estimates on a pair whose values are ``p_hi > p_lo``."""
    x = np.arange(k + 1)
    score = np.where(x[:, None] > x[None, :], 1.0, np.where(x[:, None] == x[None, :], 0.5, 0.0))
    return float(binom_pmf(k, p_hi) @ score @ binom_pmf(k, p_lo))


def ranking_by_k(groups: list[np.ndarray], ks: list[int], truth_k: int, gap: float) -> dict[str, dict[str, float]]:
    """Ranking accuracy per K over the states' alternatives; ``groups``: per state ``[A, truth_k + M]``
    returns. ``clear`` restricts to pairs whose truths differ by >= ``gap``."""
    out = {}
    for k in ks:
        scores, predicted = [], []
        for returns in groups:
            truth = mc_values(returns[:, :truth_k]).mean
            scores += pair_scores(truth, k_estimates(returns[:, truth_k:], k))
            predicted += [
                (abs(truth[i] - truth[j]), predicted_ranking(max(truth[i], truth[j]), min(truth[i], truth[j]), k))
                for i, j in itertools.combinations(range(len(truth)), 2)
                if truth[i] != truth[j]
            ]
        if not scores:
            raise ValueError("no pair of alternatives with different true values: raise --rank-states")
        gaps, accuracy = np.array(scores).T
        _, expected = np.array(predicted).T
        clear = gaps >= gap
        out[str(k)] = {
            "pairs": len(gaps),
            "accuracy": float(accuracy.mean()),
            "predicted": float(expected.mean()),
            "clear_pairs": int(clear.sum()),
            "clear_accuracy": float(accuracy[clear].mean()) if clear.any() else float("nan"),
            "clear_predicted": float(expected[clear].mean()) if clear.any() else float("nan"),
        }
    return out


def codec_agreement(int8: dict[str, MCRecord], lossless: dict[str, MCRecord], k: int) -> dict[str, Any]:
    """Agreement of the K-branch values of the same states and branch keys from the two stores."""
    a, keys = record_returns(int8, k)
    b, _ = record_returns(lossless, k)
    sa, sb = mc_values(a), mc_values(b)
    diff = np.abs(sa.mean - sb.mean)
    larger, pooled = np.maximum(sa.stderr, sb.stderr), np.hypot(sa.stderr, sb.stderr)
    return {
        "states": len(keys),
        "branches": int(a.size),
        "within_larger_stderr": float(np.mean(diff <= larger + 1e-12)),
        "within_pooled_stderr": float(np.mean(diff <= pooled + 1e-12)),
        "identical_values": int(np.sum(sa.mean == sb.mean)),
        "identical_returns": float(np.mean(a == b)),
        "mean_abs_diff": float(diff.mean()),
        "max_abs_diff": float(diff.max()),
        "per_state": [
            {
                "trajectory": t,
                "position": p,
                "int8": float(x),
                "lossless": float(y),
                "se_int8": float(u),
                "se": float(v),
            }
            for (t, p), x, y, u, v in zip(keys, sa.mean, sb.mean, sa.stderr, sb.stderr, strict=True)
        ],
    }


def critic_error(critic: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """MAE of the critic's ``[states]`` values against ``truth`` ``[states]``, next to the MAE of
    the best constant (the truths' median: what a critic that ignores the state can reach) and
    the Pearson correlation."""
    per_state = np.abs(critic - truth)
    return {
        "mae": float(per_state.mean()),
        "mae_stderr": float(per_state.std(ddof=1) / np.sqrt(len(per_state))),
        "constant_mae": float(np.abs(truth - np.median(truth)).mean()),
        "correlation": float(np.corrcoef(critic, truth)[0, 1]),
    }


def critic_ranking(groups: list[np.ndarray], critic: list[np.ndarray], truth_k: int, gap: float) -> dict[str, Any]:
    """Ranking accuracy of the critic's values ``critic`` (per state ``[A]``) of the alternatives
    whose returns are ``groups`` (per state ``[A, truth_k + M]``), as `ranking_by_k` scores an estimate."""
    scores = []
    for returns, values in zip(groups, critic, strict=True):
        scores += pair_scores(mc_values(returns[:, :truth_k]).mean, values[:, None])
    gaps, accuracy = np.array(scores).T
    clear = gaps >= gap
    return {
        "pairs": len(gaps),
        "accuracy": float(accuracy.mean()),
        "clear_pairs": int(clear.sum()),
        "clear_accuracy": float(accuracy[clear].mean()) if clear.any() else float("nan"),
    }


def padded_critic(state: Any, prompt: np.ndarray, response: np.ndarray, positions: Any, horizon: int) -> np.ndarray:
    """`critic_values` with the response padded to ``horizon`` tokens (causal: the values at
    ``positions`` do not change), so every call of a prompt length reuses one compiled forward."""
    from vinekv.trainer.ppo_baseline import critic_values

    padded = np.concatenate([response, np.zeros(horizon - len(response), np.int32)])
    return critic_values(state, prompt, padded, positions)


def ppo_policy(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The PPO baseline's state after ``--ppo-updates`` updates from the cached warm-up, trained
    as `vinekv compare --methods ppo` trains seed ``--ppo-seed``; and the run's figures."""
    from vinekv.compare import CompareConfig, build_trainer, task_data

    config = CompareConfig(methods=("ppo",), seeds=1, updates=args.ppo_updates)
    _, train_data = task_data(config)
    log(f"training the PPO baseline for {args.ppo_updates} updates (seed {args.ppo_seed})")
    with tempfile.TemporaryDirectory(prefix="vinekv-value-quality-ppo-") as out:
        trainer, _ = build_trainer("ppo", args.ppo_seed, config, train_data, Path(out))
        state = trainer.train().state
    last = trainer.history[-5:]
    info = {
        "updates": int(trainer.history[-1]["step"]),
        "seed": args.ppo_seed,
        "last_batches": {
            name: float(np.mean([h[name] for h in last if name in h]))
            for name in ("score_mean", "value_loss", "vf_clipfrac")
            if any(name in h for h in last)
        },
    }
    return state, info


# -- the phases ---------------------------------------------------------------------------------


def ranking_study(
    model: Any, tokenizer: Any, reward: Any, trajectories: list[Trajectory], args: argparse.Namespace
) -> tuple[dict[str, Any], list[list[Alternative]], list[np.ndarray]]:
    """Samples alternatives, picks ``--rank-states`` states with >= 2 of them (seeded), values
    every alternative; returns counts, the chosen states' alternatives and per state their
    ``[A, truth_k + M]`` returns."""
    config = replay_config(args, args.truth_k)
    per_state, counts = sample_alternatives(model, tokenizer, trajectories, config, args.alternatives)
    eligible = [alts for alts in per_state if len(alts) >= 2]
    rng = np.random.default_rng(args.seed)
    chosen = [eligible[i] for i in sorted(rng.permutation(len(eligible))[: args.rank_states])]
    alts = [a for state in chosen for a in state]
    log(
        f"alternatives: {counts}; {len(eligible)} of {len(per_state)} states have >= 2 distinct ones; "
        f"valuing {len(alts)} alternatives of {len(chosen)} states"
    )
    prompts = {t.tid: t.prompt for t in trajectories}
    snapshots = capture_sequences(model, [np.concatenate([prompts[a.tid], a.response]) for a in alts], CAPTURE_ROWS)
    returns = []
    for alt, snap in tqdm(zip(alts, snapshots, strict=True), total=len(alts), desc="alternatives"):
        returns.append(value_alternative(model, tokenizer, reward, args, alt, snap))
    sizes = np.cumsum([0] + [len(s) for s in chosen])
    groups = [np.stack(returns[lo:hi]) for lo, hi in itertools.pairwise(sizes)]
    info = {
        "candidate_states": len(per_state),
        "eligible_states": len(eligible),
        "states": len(chosen),
        "alternatives": len(alts),
        "alternative_counts": counts,
    }
    return info, chosen, groups


def plot(results: dict[str, Any], path: Path) -> None:
    """MAE vs K with its binomial predictions; ranking accuracy vs K; int8 vs lossless values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    critic = results["critic"]
    fig, axes = plt.subplots(1, 4 if critic else 3, figsize=(18.5 if critic else 14, 4.2))
    mae = results["mc_error"]["by_k"]
    ks = [int(k) for k in mae]
    ax = axes[0]
    ax.errorbar(
        ks,
        [mae[str(k)]["mae"] for k in ks],
        yerr=[mae[str(k)]["mae_stderr"] for k in ks],
        marker="o",
        capsize=3,
        label="measured vs 256-branch truth",
    )
    ax.plot(ks, [mae[str(k)]["exact_vs_truth"] for k in ks], "--", label="exact binomial, vs 256-branch truth")
    ax.plot(ks, [mae[str(k)]["exact"] for k in ks], ":", marker=".", label="exact binomial E|p_K - p|")
    ax.plot(ks, [mae[str(k)]["bound"] for k in ks], "k-", lw=1, label="bound sqrt(p(1-p)/K)")
    if critic:
        ax.axhline(critic["mc_error"]["mae"], color="C3", lw=1.5, label="PPO critic")
        ax.axhline(critic["mc_error"]["constant_mae"], color="C3", lw=1, ls=":", label="best constant")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (branches per state)")
    ax.set_ylabel("mean |V_K - V*|")
    ax.set_title(f"MC value error, {results['mc_error']['states']} states", fontsize=10)
    ax.legend(fontsize=7)
    rank = results["ranking"]["by_k"]
    ax = axes[1]
    ax.plot(ks, [rank[str(k)]["accuracy"] for k in ks], "o-", label=f"all pairs ({rank[str(ks[0])]['pairs']})")
    ax.plot(ks, [rank[str(k)]["predicted"] for k in ks], "--", color="C0", label="binomial prediction, all pairs")
    gap = results["args"]["rank_gap"]
    clear = rank[str(ks[0])]["clear_pairs"]
    ax.plot(ks, [rank[str(k)]["clear_accuracy"] for k in ks], "s-", color="C1", label=f"|dV*| >= {gap} ({clear})")
    ax.plot(ks, [rank[str(k)]["clear_predicted"] for k in ks], "--", color="C1", label="binomial prediction, clear")
    ax.axhline(0.5, color="k", lw=0.8, ls=":", label="chance")
    if critic:
        ax.axhline(critic["ranking"]["accuracy"], color="C3", lw=1.5, label="PPO critic, all pairs")
        ax.axhline(critic["ranking"]["clear_accuracy"], color="C3", lw=1.5, ls="-.", label="PPO critic, clear")
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(0.4, 1.0)
    ax.set_xlabel("K (branches per state)")
    ax.set_ylabel("pairs ordered like the truth")
    ax.set_title(f"ranking of alternative next steps, {results['ranking']['states']} states", fontsize=10)
    ax.legend(fontsize=7)
    codec = results["int8_vs_lossless"]
    ax = axes[2]
    x = [s["lossless"] for s in codec["per_state"]]
    y = [s["int8"] for s in codec["per_state"]]
    ax.plot([0, 1], [0, 1], "k-", lw=0.8)
    ax.scatter(x, y, s=10, alpha=0.6)
    ax.set_xlabel(f"V, lossless store (K = {codec['k']})")
    ax.set_ylabel(f"V, int8 store (K = {codec['k']})")
    ax.set_title(
        f"int8 vs lossless: {100 * codec['within_larger_stderr']:.1f}% within 1 stderr, "
        f"{codec['identical_values']}/{codec['states']} identical",
        fontsize=10,
    )
    if critic:
        ax = axes[3]
        truth = [s["truth"] for s in results["mc_error"]["per_state"]]
        ax.plot([0, 1], [0, 1], "k-", lw=0.8)
        ax.scatter(truth, critic["per_state"], s=10, alpha=0.6, color="C3")
        ax.set_xlabel("V* (256 branches)")
        ax.set_ylabel("PPO critic's V")
        ax.set_title(
            f"PPO critic after {critic['ppo']['updates']} updates: MAE {critic['mc_error']['mae']:.3f}, "
            f"r = {critic['mc_error']['correlation']:.2f}",
            fontsize=10,
        )
    policy = "the cached warm-up" if results["policy"]["kind"] == "warmup" else "the PPO baseline's policy"
    fig.suptitle(f"value quality on the arithmetic task, policy: {policy}; {results['machine']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=60, help="held-out problems, one response each (default 60)")
    parser.add_argument("--problem-seed", type=int, default=777, help="seed of the held-out problems (default 777)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rollout and branch keys (default 0)")
    parser.add_argument("--horizon", type=int, default=40, help="max_completion_length of the rollouts (default 40)")
    parser.add_argument("--truth-k", type=int, default=256, help="branches of the ground truth V* (default 256)")
    parser.add_argument(
        "--extra-branches",
        type=int,
        default=63,
        help="branches after the truth's, split into disjoint K-groups (default 63 = 7 groups of 9; with "
        "--compare-k 64 the lossless store's second replay samples 255 branches a state, one 256-row batch)",
    )
    parser.add_argument(
        "--ks", default="1,3,4,9", help="comma-separated K of the estimates (default 1,3,4,9; 4: the job's K)"
    )
    parser.add_argument("--compare-k", type=int, default=64, help="branches per state, int8 vs lossless (default 64)")
    parser.add_argument("--rank-states", type=int, default=80, help="states of the ranking study, at most (default 80)")
    parser.add_argument("--alternatives", type=int, default=4, help="next steps sampled per state (default 4)")
    parser.add_argument(
        "--rank-gap", type=float, default=0.1, help="truth gap of the 'clear' pairs of the ranking (default 0.1)"
    )
    parser.add_argument("--max-rows", type=int, default=256, help="rows (states x K) decoded together (default 256)")
    parser.add_argument(
        "--policy",
        choices=("warmup", "ppo"),
        default="warmup",
        help="the cached warm-up, or it after --ppo-updates PPO updates, critic included (default warmup)",
    )
    parser.add_argument("--ppo-updates", type=int, default=60, help="updates of the PPO policy (default 60)")
    parser.add_argument("--ppo-seed", type=int, default=0, help="seed of the PPO run (default 0)")
    parser.add_argument(
        "--out", help="results JSON (default benchmarks/results/value_quality.json, value_quality-ppo.json with ppo)"
    )
    parser.add_argument("--plot", help="plot (default docs/img/value-quality.png, value-quality-ppo.png with ppo)")
    args = parser.parse_args()
    suffix = "-ppo" if args.policy == "ppo" else ""
    args.out = args.out or str(REPO / f"benchmarks/results/value_quality{suffix}.json")
    args.plot = args.plot or str(REPO / f"docs/img/value-quality{suffix}.png")
    args.ks = [int(k) for k in args.ks.split(",")]
    if args.compare_k > args.truth_k:
        parser.error("--compare-k must be <= --truth-k (the lossless store's first compare-k branches are reused)")
    return args


def main() -> int:
    args = parse_args()
    start = time.perf_counter()
    enable_compilation_cache()
    quiet_logs()
    from vinekv.tasks.arithmetic import make_dataset, reward
    from vinekv.tasks.warmup import WarmupConfig, accuracy, warm_up

    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    warmup = WarmupConfig()
    policy = warm_up(warmup)
    model, tokenizer = policy.model, policy.tokenizer
    ppo_state, ppo_info = None, None
    if args.policy == "ppo":
        ppo_state, ppo_info = ppo_policy(args)
        model = ppo_state.model.model  # the language model under the value head
        seconds["ppo_training"] = time.perf_counter() - clock
        clock = time.perf_counter()
    data = make_dataset(args.problems, args.problem_seed, warmup.task_steps, warmup.operand_max)
    seen = set(make_dataset(warmup.train_problems, warmup.seed, warmup.task_steps, warmup.operand_max)["prompt"])
    trajectories = sample_responses(model, tokenizer, data, replay_config(args, 1))
    solved = [
        reward([p], [tokenizer.decode(t.response.tolist(), skip_special_tokens=True)], [t.answer])[0]
        for p, t in zip(data["prompt"], trajectories, strict=True)
    ]
    seconds["setup"] = time.perf_counter() - clock
    log(f"{len(trajectories)} responses sampled, {np.mean(solved):.2f} correct; spilling into int8 and lossless stores")

    with tempfile.TemporaryDirectory(prefix="vinekv-value-quality-") as scratch:
        clock = time.perf_counter()
        lossless = spill(Path(scratch) / "lossless", "lossless", trajectories, model)
        int8 = spill(Path(scratch) / "int8", "int8", trajectories, model)
        sizes = {"lossless": dataclasses.asdict(lossless.size(RUN)), "int8": dataclasses.asdict(int8.size(RUN))}
        log(f"int8 vs lossless: both stores replayed with K = {args.compare_k}, same branch keys")
        compare = replay_config(args, args.compare_k)
        codec = codec_agreement(
            replay(int8, model, tokenizer, reward, compare),
            replay(lossless, model, tokenizer, reward, compare),
            args.compare_k,
        )
        seconds["int8_vs_lossless"] = time.perf_counter() - clock
        log(f"{100 * codec['within_larger_stderr']:.1f}% of {codec['states']} states within one stderr")
        clock = time.perf_counter()
        total = args.truth_k + args.extra_branches
        log(f"MC error: lossless store extended to {total} branches a state ({args.truth_k} truth + the rest)")
        returns, keys = record_returns(replay(lossless, model, tokenizer, reward, replay_config(args, total)), total)
        int8.close()
        lossless.close()
    truth = mc_values(returns[:, : args.truth_k]).mean
    mae = mae_by_k(truth, returns[:, args.truth_k :], args.ks, args.truth_k)
    seconds["mc_error"] = time.perf_counter() - clock
    clock = time.perf_counter()
    rank_info, chosen, groups = ranking_study(model, tokenizer, reward, trajectories, args)
    ranking = ranking_by_k(groups, args.ks, args.truth_k, args.rank_gap)
    seconds["ranking"] = time.perf_counter() - clock
    open_states = (truth > 0) & (truth < 1)
    critic = None
    if ppo_state is not None:
        by_tid = {t.tid: t for t in trajectories}
        at_states = np.concatenate(
            [
                padded_critic(ppo_state, t.prompt, t.response, [p for tid, p in keys if tid == t.tid], args.horizon)
                for t in trajectories
            ]
        )
        at_alternatives = [
            np.array(
                [
                    padded_critic(ppo_state, by_tid[a.tid].prompt, a.response, [len(a.response)], args.horizon)[0]
                    for a in state_alternatives
                ]
            )
            for state_alternatives in chosen
        ]
        critic = {
            "ppo": ppo_info,
            "mc_error": critic_error(at_states, truth),
            "open_mc_error": critic_error(at_states[open_states], truth[open_states]),
            "ranking": critic_ranking(groups, at_alternatives, args.truth_k, args.rank_gap),
            "per_state": at_states.tolist(),
        }
    seconds["total"] = time.perf_counter() - start

    results = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, CPU only",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": vars(args),
        "seconds": seconds,
        "policy": {"kind": args.policy, "warmup": dataclasses.asdict(warmup), "path": str(policy.path)},
        "responses": {
            "problems": len(trajectories),
            "in_warmup_training_set": int(sum(p in seen for p in data["prompt"])),
            "correct": float(np.mean(solved)),
            "greedy_accuracy": accuracy(model, tokenizer, data),
            "mean_tokens": float(np.mean([len(t.response) for t in trajectories])),
        },
        "mc_error": {
            "states": len(keys),
            "open_states": int(open_states.sum()),
            "by_k": mae,
            "open_by_k": mae_by_k(truth[open_states], returns[open_states, args.truth_k :], args.ks, args.truth_k),
            "per_state": [
                {"trajectory": t, "position": p, "truth": float(v)} for (t, p), v in zip(keys, truth, strict=True)
            ],
        },
        "ranking": {**rank_info, "by_k": ranking},
        "int8_vs_lossless": {"k": args.compare_k, "store_bytes": sizes, **codec},
        "critic": critic,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    plot(results, Path(args.plot))
    report(results)
    return 0


def report(results: dict[str, Any]) -> None:
    """Prints the key figures."""
    mc, rank, codec = results["mc_error"], results["ranking"], results["int8_vs_lossless"]
    print(
        f"\nwall time {results['seconds']['total']:.0f} s; {mc['states']} states ({mc['open_states']} with 0 < V* < 1)"
    )
    print("K   MAE (+- se)        exact vs 256  exact E|p_K-p|  bound   | ranking all (pred)  clear (pred)")
    for k, m in mc["by_k"].items():
        r = rank["by_k"][k]
        print(
            f"{k:<3} {m['mae']:.4f} +- {m['mae_stderr']:.4f}  {m['exact_vs_truth']:.4f}        {m['exact']:.4f}"
            f"          {m['bound']:.4f}  | {r['accuracy']:.3f} ({r['predicted']:.3f})       "
            f"{r['clear_accuracy']:.3f} ({r['clear_predicted']:.3f})"
        )
    critic = results["critic"]
    if critic:
        err, rank_c = critic["mc_error"], critic["ranking"]
        print(
            f"PPO critic ({critic['ppo']['updates']} updates): MAE {err['mae']:.4f} +- {err['mae_stderr']:.4f} "
            f"(best constant {err['constant_mae']:.4f}, r = {err['correlation']:.2f}) | ranking all "
            f"{rank_c['accuracy']:.3f}, clear {rank_c['clear_accuracy']:.3f}"
        )
    print(
        f"int8 vs lossless (K = {codec['k']}): {100 * codec['within_larger_stderr']:.1f}% within the larger stderr, "
        f"{100 * codec['within_pooled_stderr']:.1f}% within the pooled one, {codec['identical_values']}/"
        f"{codec['states']} identical values, max |dV| {codec['max_abs_diff']:.4f}"
    )


if __name__ == "__main__":
    sys.exit(main())
