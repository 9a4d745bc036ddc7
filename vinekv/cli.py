"""The `vinekv` command line.

  vinekv demo [--config FILE] [--family F] [--seed N] [--kv-dtype D]
      sample responses on a tiny random model, snapshot/resume them, report agreement.
"""

from __future__ import annotations

import argparse
import sys

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()


def _demo(args: argparse.Namespace) -> int:
    from configs import DemoConfig, load
    from vinekv.demo import format_report, run_demo

    overrides = {"family": args.family, "seed": args.seed, "kv_dtype": args.kv_dtype}
    if args.config:
        config = load(DemoConfig, args.config, **overrides)
    else:
        config = DemoConfig(**{k: v for k, v in overrides.items() if v is not None})
    report = run_demo(config)
    print(format_report(report))
    return 0 if report.all_agree else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vinekv", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="snapshot/resume demo on a tiny random model")
    demo.add_argument("--config", help="TOML file with DemoConfig fields (see configs/demo.toml)")
    demo.add_argument("--family", help="model family: llama, qwen2, qwen3, mistral")
    demo.add_argument("--seed", type=int)
    demo.add_argument("--kv-dtype", choices=["float32", "bfloat16"])
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    quiet_logs()
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"vinekv {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
