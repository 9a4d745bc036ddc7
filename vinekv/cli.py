"""The `vinekv` command line.

vinekv demo [--config FILE] [--family F] [--seed N] [--kv-dtype D] [--store PATH] [--codec C]
    sample responses on a tiny random model, spill their KV to a snapshot store, resume
    from stored prefixes, report agreement.
vinekv train [--config FILE] [--mode off|lite|full] [--strategy memory|disk|recompute] [--steps N] [--output DIR]
             [--offline-run RUN [--offline-store STORE]] [--save-steps N] [--resume] [--async-replay]
    VinePPO on the built-in arithmetic task from the cached warm-up: held-out accuracy before
    and after, per-step metrics, the store, checkpoints and a PNG plot under --output;
    --async-replay values each batch in a worker process while the next one is generated.
vinekv rollout STORE --run RUN [--policy task|task:DIR] [--problems N] [--group G] ...
    sample G responses per arithmetic problem with a policy and spill their KV to a new run.
vinekv compare [--methods off,ppo,lite,full] [--seeds 3] [--updates 24 | --budget-s S] [--output DIR]
    GRPO vs PPO vs VinePPO-Lite vs VinePPO from the same warm-up: held-out accuracy per method and seed.
vinekv inspect STORE [--run RUN [--trajectory T [--plot FILE.png]]] [--tokenizer DIR]
    a store's runs, one run's trajectories, one trajectory's steps with MC values and advantages.
vinekv verify STORE [--run RUN ...]
    read every stored byte of the runs, check digests and checksums; list damaged files.
vinekv gc STORE [--grace SECONDS]
    remove what crashed writes and interrupted deletions left (never a committed trajectory).
vinekv replay STORE --run RUN [--model SPEC] [--reward SPEC] [--mode full|lite] [--branches K] ...
    branch replay of a stored run into MC values written back into the store; run again with
    more --branches (or adaptive rounds) it samples only the branches each state lacks; values
    sampled by another policy are valued again (--keep-stale-values keeps them); --shard I/N
    values one of N disjoint parts of the run (N processes cover it exactly once); --ray [ADDRESS]
    [--workers N] spreads the run over N Ray actors (a new local Ray instance without ADDRESS).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from vinekv.kvstore.backends.interface import GC_GRACE_S
from vinekv.kvstore.codecs import CODECS
from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs
from vinekv.trainer.field_types import did_you_mean

silence_xla_logs()


def bounded(kind: type, low: float | None = None, high: float | None = None, above: bool = False):
    """An argparse type: ``kind`` (int or float) in ``[low, high]`` (``(low, high]`` when
    ``above``), so a bad value is refused naming the option before anything loads."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low:g}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text}")
        return value

    return parse


COUNT = bounded(int, 1)  # counts of things: >= 1
NON_NEGATIVE = bounded(int, 0)  # seeds, intervals where 0 means off
SECONDS = bounded(float, 0)
POSITIVE = bounded(float, 0, above=True)
PROBABILITY_MASS = bounded(float, 0, 1, above=True)


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped option, verb or choice."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        if unknown:
            options = {o for p in self._parsers() for a in p._actions for o in a.option_strings}
            for token in unknown.group(1).split():
                if token.startswith("--"):
                    message += did_you_mean(token.split("=")[0], options)
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice:
            message += did_you_mean(choice.group(1), re.findall(r"'([^']*)'", choice.group(2)))
        super().error(message)

    def _parsers(self) -> list[argparse.ArgumentParser]:
        subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        return [self, *(p for a in subs for p in a.choices.values())]


def _demo(args: argparse.Namespace) -> int:
    from vinekv.configs import DemoConfig, load
    from vinekv.demo import format_report, run_demo

    overrides = {
        "family": args.family,
        "seed": args.seed,
        "kv_dtype": args.kv_dtype,
        "store": args.store,
        "codec": args.codec,
    }
    if args.config:
        config = load(DemoConfig, args.config, **overrides)
    else:
        config = DemoConfig(**{k: v for k, v in overrides.items() if v is not None})
    report = run_demo(config)
    print(format_report(report))
    return 0 if report.all_agree else 1


def _train(args: argparse.Namespace) -> int:
    from vinekv.configs import TrainConfig, load
    from vinekv.train import NothingToDo, format_training, run_training

    if args.offline_store and not args.offline_run:  # it would silently move the online job's store
        raise ValueError("--offline-store needs --offline-run (the online job's store is <output>/kv)")
    overrides = {
        "vineppo_mode": args.mode,
        "vineppo_cache_strategy": args.strategy,
        "max_training_steps": args.steps,
        "save_steps": args.save_steps,
        "vineppo_offline_run": args.offline_run,
        "vineppo_store": args.offline_store,
        "vineppo_async_replay": True if args.async_replay else None,
    }
    top = {
        "seed": args.seed,
        "output": args.output,
        "plot": False if args.no_plot else None,
        "eval_every": args.eval_every,
        "resume": True if args.resume else None,
    }
    config = load(TrainConfig, args.config) if args.config else TrainConfig()
    config = TrainConfig(
        **{
            **dataclasses.asdict(config),
            **{k: v for k, v in top.items() if v is not None},
            "trainer": {**config.trainer, **{k: v for k, v in overrides.items() if v is not None}},
        }
    )
    try:
        report = run_training(config)
    except NothingToDo as done:
        print(f"vinekv train: nothing to do: {done}")
        return 0
    print(format_training(report))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from vinekv.inspection import inspect_store

    print(inspect_store(args.store, args.run, args.trajectory, args.plot, args.tokenizer))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from vinekv.kvstore import SnapshotStore

    with SnapshotStore.open(args.store, mode="r") as store:
        runs = args.run or store.runs()
        problems = store.verify(runs)
        if not problems:
            print(f"ok: {sum(len(store.trajectories(r)) for r in runs)} trajectories in {len(runs)} runs intact")
            return 0
    for problem in problems:  # each message names the file
        print(f"DAMAGED: {problem.message}")
    print(f"{len(problems)} damaged entries in {len(runs)} runs")
    return 1


def _gc(args: argparse.Namespace) -> int:
    from vinekv.kvstore import SnapshotStore

    with SnapshotStore.open(args.store, mode="r+") as store:  # opening for writing sweeps first
        report = store.collect_garbage(args.grace)
        removed = store.swept_on_open.removed + report.removed
    for where in removed:
        print(f"removed {where}")
    if store.swept_on_open.busy:
        print("other writers are active: their staging folders were left alone")
    young = f"; kept {len(report.kept)} unmarked attempts younger than {args.grace:g} s (writes may be in flight)"
    print(f"removed {len(removed)} leftovers" + (young if report.kept else ""))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from vinekv.kvstore import SnapshotStore
    from vinekv.kvstore.schema import ROLLOUT_FIELD
    from vinekv.replay import ReplayConfig
    from vinekv.replay.branch_replay import parse_shard
    from vinekv.replay.config import RolloutRecipe
    from vinekv.replay.engines import ESurgeOptions
    from vinekv.replay_defaults import SAMPLING_OPTIONS, replay_settings
    from vinekv.specs import load_model, load_reward

    shard = parse_shard(args.shard) if args.shard else None  # before the model loads
    if args.ray is None and (args.workers is not None or args.worker_gpus is not None):
        raise ValueError("--workers and --worker-gpus need --ray")
    with SnapshotStore.open(args.store, mode="r") as store:  # the store and run exist before the model loads
        runs = store.runs()
        if args.run not in runs:
            raise ValueError(f"no run {args.run!r} in {args.store}{did_you_mean(args.run, runs)}; runs: {runs}")
        stored = store.run_fields(args.run).get(ROLLOUT_FIELD)
    where = f"run {args.run!r} of {args.store}"
    recipe = None if stored is None else RolloutRecipe.from_fields(stored, where)
    given = {name: getattr(args, name) for name in SAMPLING_OPTIONS}
    settings, recorded = replay_settings({**given, "model": args.model, "reward": args.reward}, recipe, args.run)
    if recorded:
        print(f"from the run's rollout recipe: {', '.join(f'{n} {settings[n]}' for n in recorded)}")
    config = ReplayConfig(
        mode=args.mode,
        branches=args.branches,
        max_tokens=args.max_tokens,
        horizon=settings["horizon"],
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        top_k=settings["top_k"],
        sampler=settings["sampler"],
        stop_token_ids=settings["stop_token_ids"],
        max_states=args.max_states,
        state_selection=args.state_selection,
        lite_anchor_stride=args.anchor_stride,
        unfinished_reward=None if args.unfinished_reward.lower() == "none" else float(args.unfinished_reward),
        max_branches=args.max_branches,
        adaptive_ci=args.adaptive_ci,
        seed=args.seed,
        engine=args.engine,
    )
    esurge = ESurgeOptions(page_size=args.esurge_page_size, page_budget_mb=args.esurge_page_budget_mb)
    options = {
        "metrics_path": args.metrics,
        "allow_stale": args.allow_stale,
        "keep_stale_values": args.keep_stale_values,
        "esurge_options": esurge,
    }
    reward = load_reward(settings["reward"])  # a spec that does not load fails here, before any model
    if args.ray is not None:
        from vinekv.replay.ray_replay import ReplayWorkerError, replay_run_ray

        try:
            report = replay_run_ray(
                args.store,
                args.run,
                settings["model"],
                settings["reward"],
                config,
                num_workers=2 if args.workers is None else args.workers,
                address=args.ray,
                worker_options={"num_cpus": 1, "num_gpus": args.worker_gpus or 0},
                **options,
            )
        except ReplayWorkerError as err:  # a worker could not start, or workers kept dying
            print(f"vinekv replay: error: {err}", file=sys.stderr)
            return 2
    else:
        from vinekv.replay import replay_run

        model, tokenizer = load_model(settings["model"])
        with SnapshotStore.open(args.store, mode="r+") as store:
            report = replay_run(store, args.run, model, tokenizer, reward, config, shard=shard, **options)
    print(_replay_summary(report) + ("" if args.ray is None else _ray_summary(report)))
    return 0


def _replay_summary(report) -> str:
    """One line of a `ReplayReport`'s counts and seconds."""
    stale = f", {report.stale} valued again: their values came from another policy" if report.stale else ""
    return (
        f"replayed {report.trajectories} trajectories ({report.skipped} already valued{stale}): "
        f"{report.states} states, "
        f"{report.branches} branches, {report.branch_tokens} branch tokens "
        f"({report.branch_tokens / max(1, report.rollout_tokens):.1f} per rollout token), "
        f"{report.tokens_per_second:.0f} tokens/s; time: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    )


def _ray_summary(report) -> str:
    """What a `RayReplayReport` adds to the summary line: workers, wall time, retries."""
    retried = f", {len(report.retried)} trajectories valued again after their worker died" if report.retried else ""
    return f"; {report.workers} Ray workers, {report.wall_seconds:.1f} s wall (times above: summed over them){retried}"


def _rollout(args: argparse.Namespace) -> int:
    from vinekv.rollout import RolloutConfig, format_rollout, sample_run
    from vinekv.specs import load_model
    from vinekv.tasks.arithmetic import make_dataset, reward
    from vinekv.tasks.warmup import WarmupConfig

    config = RolloutConfig(
        problems=args.problems,
        group=args.group,
        seed=args.seed,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
    )
    model, tokenizer = load_model(args.policy)
    task = WarmupConfig()
    dataset = make_dataset(config.problems, config.seed + 1, steps=task.task_steps, operand_max=task.operand_max)
    report = sample_run(
        args.store,
        args.run,
        model,
        tokenizer,
        dataset,
        reward,
        config,
        args.codec,
        policy_spec=args.policy,
        reward_spec="task",
    )
    print(format_rollout(report, args.store))
    return 0


def compare_options(parser: argparse.ArgumentParser) -> None:
    """`vinekv compare`'s options (shared with benchmarks/compare_bench.py)."""
    parser.add_argument("--config", help="TOML file with CompareConfig fields (options given here override it)")
    parser.add_argument(
        "--methods",
        help="comma-separated subset of off (GRPO), ppo (PPO with a value network), lite, full (default all four)",
    )
    parser.add_argument("--seeds", type=COUNT, help="runs per method (default 5)")
    parser.add_argument("--updates", type=COUNT, help="policy updates per run (default 60)")
    parser.add_argument("--eval-every", type=COUNT, help="updates between held-out evaluations (default 10)")
    parser.add_argument(
        "--budget-s", type=SECONDS, help="train every run for this many seconds instead (default 0: off)"
    )
    parser.add_argument("--max-updates", type=COUNT, help="cap on updates with --budget-s (default 400)")
    parser.add_argument("--eval-problems", type=COUNT, help="held-out problems (default 400)")
    parser.add_argument(
        "--lite-anchor-stride",
        type=COUNT,
        help="Lite: an extra anchor every N response tokens (default 8; longer than a response: the final anchor only)",
    )


def compare_config(args: argparse.Namespace):
    """`CompareConfig` from ``--config`` (if any) with the options given on top."""
    from vinekv.compare import CompareConfig
    from vinekv.configs import load

    overrides = {
        "methods": None if args.methods is None else tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        "seeds": args.seeds,
        "updates": args.updates,
        "eval_every": args.eval_every,
        "budget_s": args.budget_s,
        "max_updates": args.max_updates,
        "eval_problems": args.eval_problems,
        "lite_anchor_stride": args.lite_anchor_stride,
    }
    if args.config:
        return load(CompareConfig, args.config, **overrides)
    return CompareConfig(**{k: v for k, v in overrides.items() if v is not None})


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vinekv.compare import compare, format_comparison, plot_comparison, save_results

    config = compare_config(args)
    output = Path(args.output)
    results = compare(config, on_run=lambda done: save_results(config, done, output / "compare.json"))
    data = output / "compare.json"
    png = plot_comparison(config, results, output / "compare.png")
    print(format_comparison(config, results))
    print(f"results: {data}\nplot: {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vinekv", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="snapshot/resume demo on a tiny random model")
    demo.add_argument("--config", help="TOML file with DemoConfig fields (see configs/demo.toml)")
    demo.add_argument("--family", help="model family: llama, qwen2, qwen3, mistral (default llama)")
    demo.add_argument("--seed", type=NON_NEGATIVE, help="seed of the model weights and the sampling keys (default 0)")
    demo.add_argument("--kv-dtype", choices=["float32", "bfloat16"], help="dtype of the KV cache (default float32)")
    demo.add_argument("--store", help="snapshot store path to keep (default: a temporary store)")
    demo.add_argument(
        "--codec",
        choices=sorted(CODECS),
        help="codec of the demo's store (default lossless, so resumed logits are exact; the API's default is int8)",
    )
    demo.set_defaults(func=_demo)
    train = sub.add_parser(
        "train",
        help="VinePPO on the built-in arithmetic task from the cached warm-up, held-out accuracy before and after",
    )
    train.add_argument("--config", help="TOML file with TrainConfig fields (default: configs/train.toml's values)")
    train.add_argument("--mode", choices=["off", "lite", "full"], help="vineppo_mode (default full; off = GRPO)")
    train.add_argument("--strategy", choices=["memory", "disk", "recompute"], help="KV cache strategy (default disk)")
    train.add_argument(
        "--steps",
        type=COUNT,
        help="policy updates (default 60): vineppo_ppo_epochs per batch, the last batch cut to make exactly N",
    )
    train.add_argument(
        "--eval-every",
        type=NON_NEGATIVE,
        help="held-out greedy accuracy every N updates during training (default 10; 0: off)",
    )
    train.add_argument("--seed", type=NON_NEGATIVE, help="seed of the training problems and sampling keys (default 0)")
    train.add_argument(
        "--output", help="folder for the store, checkpoints, metrics.jsonl and plot (default runs/train)"
    )
    train.add_argument("--no-plot", action="store_true", help="skip <output>/vinekv-train.png")
    train.add_argument(
        "--async-replay",
        action="store_true",
        help="disk strategy: a worker process values batch N while the trainer generates batch N+1 "
        "(vineppo_async_replay; one update of policy lag)",
    )
    train.add_argument(
        "--offline-run",
        metavar="RUN",
        help="train on this stored run's MC-valued trajectories (`vinekv rollout` + `vinekv replay`) instead of "
        "generating; batches take the problems in the order `vinekv rollout --seed` sampled them",
    )
    train.add_argument(
        "--offline-store", metavar="STORE", help="with --offline-run: the store holding it (default <output>/kv)"
    )
    train.add_argument(
        "--save-steps",
        type=COUNT,
        help="also checkpoint every N optimizer steps (default: only the final policy, in <output>/checkpoints)",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in <output>/checkpoints up to --steps (default: start afresh; "
        "an output that already holds a checkpoint is refused)",
    )
    train.set_defaults(func=_train)
    rollout = sub.add_parser(
        "rollout", help="sample a group of responses per task prompt with a policy and spill their KV to a store"
    )
    rollout.add_argument("store", help="store path or TensorStore kvstore URL (created if missing)")
    rollout.add_argument("--run", required=True, help="name of the new run the trajectories go to")
    rollout.add_argument(
        "--policy",
        default="task",
        help="task (the warmed-up arithmetic policy, default), task:DIR (the newest checkpoint of "
        "`vinekv train --output DIR`) or module:factory -> (model, tokenizer)",
    )
    rollout.add_argument(
        "--problems",
        type=COUNT,
        default=16,
        help="arithmetic problems: the first N that `vinekv train --seed S` trains on (default 16)",
    )
    rollout.add_argument("--group", type=COUNT, default=4, help="responses per problem (default 4)")
    rollout.add_argument(
        "--seed",
        type=NON_NEGATIVE,
        default=0,
        help="problems' seed (as vinekv train --seed) and sampling seed (default 0)",
    )
    rollout.add_argument("--max-tokens", type=COUNT, default=40, help="token budget of a response (default 40)")
    rollout.add_argument("--temperature", type=POSITIVE, default=1.0, help="sampling temperature (default 1)")
    rollout.add_argument("--top-p", type=PROBABILITY_MASS, default=1.0, help="nucleus mass (default 1: off)")
    rollout.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="top-k (default 0: off)")
    rollout.add_argument("--codec", choices=sorted(CODECS), default="int8", help="codec of a new store (default int8)")
    rollout.set_defaults(func=_rollout)
    comparison = sub.add_parser(
        "compare",
        help="GRPO vs VinePPO-Lite vs VinePPO on the arithmetic task from the same warm-up, held-out accuracy curves",
    )
    compare_options(comparison)
    comparison.add_argument(
        "--output", default="runs/compare", help="folder of compare.json and compare.png (default runs/compare)"
    )
    comparison.set_defaults(func=_compare)
    inspect = sub.add_parser("inspect", help="a store's runs, a run's trajectories, a trajectory's steps")
    inspect.add_argument("store", help="store path or TensorStore kvstore URL")
    inspect.add_argument("--run", help="list this run's trajectories (default: a table of the store's runs)")
    inspect.add_argument(
        "--trajectory", help="with --run: this trajectory's steps with their text, MC value, stderr, K and advantage"
    )
    inspect.add_argument(
        "--plot", metavar="FILE.png", help="with --trajectory: draw its MC values and per-token advantages here"
    )
    inspect.add_argument(
        "--tokenizer",
        metavar="FOLDER",
        help="Hugging Face tokenizer folder to decode step text (default: the arithmetic task's tokenizer "
        "when the store's vocabulary is the task's, else the byte tokenizer)",
    )
    inspect.set_defaults(func=_inspect)
    verify = sub.add_parser("verify", help="check every stored byte (digests, checksums, missing files)")
    verify.add_argument("store", help="store path or TensorStore kvstore URL")
    verify.add_argument("--run", action="append", help="a run to check (repeatable; default: every run)")
    verify.set_defaults(func=_verify)

    gc = sub.add_parser("gc", help="remove what crashed writes and interrupted deletions left")
    gc.add_argument("store", help="store path or TensorStore kvstore URL")
    gc.add_argument(
        "--grace",
        type=SECONDS,
        default=GC_GRACE_S,
        help=f"object stores: keep unmarked attempts younger than this many seconds (default {GC_GRACE_S:g}), "
        "which may be writes in flight; local stores sweep only when no other writer is active",
    )
    gc.set_defaults(func=_gc)

    replay = sub.add_parser("replay", help="branch replay of a stored run into MC values")
    replay.add_argument("store", help="store path or TensorStore kvstore URL")
    replay.add_argument("--run", required=True, help="the stored run to value")
    replay.add_argument(
        "--model",
        help="the policy: tiny[:family[:seed]], task (the warmed-up arithmetic policy), task:DIR (newest "
        "checkpoint of `vinekv train --output DIR`) or module:factory -> (model, tokenizer) (default: the policy "
        "the run records, `vinekv rollout --policy`; else tiny, the demo's)",
    )
    replay.add_argument(
        "--reward",
        help="'letters' (the demo's toy), 'task' (the arithmetic verifier) or module:function (default: the "
        "reward the run records; else letters)",
    )
    replay.add_argument(
        "--mode", choices=["full", "lite"], default="full", help="full: every step start; lite: anchors"
    )
    replay.add_argument(
        "--branches",
        type=COUNT,
        default=8,
        help="K branches per state (adaptive: per round); a run valued with fewer gets only the missing ones",
    )
    replay.add_argument("--max-tokens", type=COUNT, default=64, help="token budget of a branch")
    replay.add_argument(
        "--horizon",
        type=COUNT,
        help="the rollouts' token budget: a branch from response position b gets <= horizon - b (default: the "
        "run's recorded budget; an option contradicting what the run records is refused, as for the sampling below)",
    )
    replay.add_argument(
        "--temperature", type=SECONDS, help="sampling temperature of the branches (default: the run's; else 1)"
    )
    replay.add_argument(
        "--top-p", type=PROBABILITY_MASS, help="nucleus mass of the branches (default: the run's; else 1, off)"
    )
    replay.add_argument("--top-k", type=NON_NEGATIVE, help="top-k of the branches, 0: off (default: the run's; else 0)")
    replay.add_argument(
        "--sampler",
        choices=["generate", "esurge"],
        help="whose order of temperature/top-k/top-p to follow: the rollouts' generation path (default: the run's)",
    )
    replay.add_argument("--max-states", type=COUNT, help="full mode: cap on valued states per trajectory")
    replay.add_argument(
        "--state-selection", choices=["first", "spread", "entropy"], default="first", help="which states a cap values"
    )
    replay.add_argument("--anchor-stride", type=COUNT, help="lite mode: also an anchor every N response tokens")
    replay.add_argument(
        "--unfinished-reward",
        default="0",
        help="return of a branch cut off by its budget, or 'none' to score it as it is (default 0)",
    )
    replay.add_argument("--max-branches", type=COUNT, help="adaptive K: cap on branches per state")
    replay.add_argument("--adaptive-ci", type=POSITIVE, help="adaptive K: target 95%% CI half-width of a state's value")
    replay.add_argument("--seed", type=NON_NEGATIVE, default=0, help="run seed of the branch keys")
    replay.add_argument(
        "--engine",
        choices=["auto", "vanilla", "esurge"],
        default="auto",
        help="branch engine (default auto: eSurge on accelerators, vanilla on CPU; docs/engines.md)",
    )
    replay.add_argument(
        "--esurge-page-budget-mb",
        type=POSITIVE,
        help="eSurge engine: MiB of KV pages (default: 16 on CPU, eSurge's own sizing on accelerators)",
    )
    replay.add_argument(
        "--esurge-page-size", type=COUNT, default=16, help="eSurge engine: tokens per page (default 16)"
    )
    replay.add_argument("--metrics", help="append one JSON line per trajectory here")
    spread = replay.add_mutually_exclusive_group()
    spread.add_argument(
        "--shard",
        metavar="I/N",
        help="value only shard I of N of the run's trajectories (by a hash of the id): N processes with "
        "I = 0..N-1 (a SLURM array, one per pod host) cover the run exactly once, with a single process's values",
    )
    spread.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="value the run on Ray actors, each loading --model and --reward and reading the store itself: on the "
        "cluster at ADDRESS (host:port, auto, ray://host:port) or, without ADDRESS, on a new local Ray instance; "
        "a worker that dies loses only its unfinished trajectory, which another worker values (docs/distributed.md)",
    )
    replay.add_argument("--workers", type=COUNT, help="with --ray: Ray actors valuing the run (default 2)")
    replay.add_argument(
        "--worker-gpus",
        type=SECONDS,
        help="with --ray: GPUs per worker (default 0; Ray hides the GPUs from a worker that asks for none)",
    )
    replay.add_argument("--allow-stale", action="store_true", help="value snapshots of another policy")
    replay.add_argument(
        "--keep-stale-values",
        action="store_true",
        help="keep MC values sampled by another policy as they are (default: value those trajectories again)",
    )
    replay.set_defaults(func=_replay)
    return parser


INTERRUPTED = 130  # the shell's code for a process ended by SIGINT
AFTER_INTERRUPT = {
    "train": "committed batches and checkpoints are kept; continue with --resume",
    "rollout": "trajectories spilled before it are committed; sample again into a new --run",
    "replay": "values written before it are kept; run the same command again to value the rest",
    "compare": "finished runs are in compare.json",
}


def main(argv: list[str] | None = None) -> int:
    """Runs a verb; exit codes: 0 done, 1 a check found problems (demo, verify), 2 bad input or
    a failed job (one line on stderr naming it), 130 interrupted (Ctrl-C)."""
    from vinekv.kvstore.store import StoreError

    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    quiet_logs()
    try:
        return args.func(args)
    except KeyboardInterrupt as err:
        after = str(err) or AFTER_INTERRUPT.get(args.command, "what was committed before it is kept")
        print(f"\nvinekv {args.command}: interrupted; {after}", file=sys.stderr)
        return INTERRUPTED
    except (StoreError, ValueError, TypeError, OSError, KeyError) as err:
        print(f"vinekv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
