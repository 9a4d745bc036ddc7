"""The `vinekv` command line.

  vinekv demo [--config FILE] [--family F] [--seed N] [--kv-dtype D] [--store PATH] [--codec C]
      sample responses on a tiny random model, spill their KV to a snapshot store, resume
      from stored prefixes, report agreement.
  vinekv inspect STORE [--run RUN]
      list a snapshot store's runs, trajectories and sizes.
"""

from __future__ import annotations

import argparse
import sys

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()


def _demo(args: argparse.Namespace) -> int:
    from configs import DemoConfig, load
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


def _inspect(args: argparse.Namespace) -> int:
    from kvstore import SnapshotStore

    with SnapshotStore.open(args.store, mode="r") as store:
        print(f"{store!r}\nlayout: {store.layout}")
        for run in [args.run] if args.run else store.runs():
            size = store.size(run)
            ids = store.trajectories(run)
            print(f"run {run}: {len(ids)} trajectories, {size.raw} raw bytes, {size.stored} stored ({size.ratio:.2f}x)")
            if args.run:
                for tid in ids:
                    info = store.trajectory_info(run, tid)
                    print(f"  {tid}: {info['length']} tokens (prompt {info['prompt_len']}), fields {info['fields']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vinekv", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="snapshot/resume demo on a tiny random model")
    demo.add_argument("--config", help="TOML file with DemoConfig fields (see configs/demo.toml)")
    demo.add_argument("--family", help="model family: llama, qwen2, qwen3, mistral")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--kv-dtype", choices=["float32", "bfloat16"])
    demo.add_argument("--store", help="snapshot store path to keep (default: a temporary store)")
    demo.add_argument("--codec", choices=["lossless", "int8"])
    demo.set_defaults(func=_demo)
    inspect = sub.add_parser("inspect", help="list a snapshot store's runs, trajectories and sizes")
    inspect.add_argument("store", help="store path or TensorStore kvstore URL")
    inspect.add_argument("--run", help="list this run's trajectories")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kvstore.store import StoreError

    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    quiet_logs()
    try:
        return args.func(args)
    except (StoreError, ValueError, TypeError, OSError, KeyError) as err:
        print(f"vinekv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
