"""GRPO vs PPO vs VinePPO-Lite vs full VinePPO on the arithmetic task (`vinekv.compare`), with the
results and plots kept in the repository.

    PYTHONPATH=. .venv/bin/python benchmarks/compare_bench.py [--seeds 3] [--updates 24] [--budget-s 0]

Same runs as `vinekv compare`; writes benchmarks/results/compare[-budget][-TAG].json and
docs/img/compare[-budget][-TAG].png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from vinekv.cli import compare_config, compare_options
    from vinekv.compare import compare, format_comparison, plot_comparison, save_results

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare_options(parser)
    parser.add_argument("--tag", default="", help="suffix of the result files (default none)")
    args = parser.parse_args()
    quiet_logs()
    enable_compilation_cache()
    config = compare_config(args)
    name = "compare" + ("-budget" if config.budget_s else "") + (f"-{args.tag}" if args.tag else "")
    results = compare(
        config, on_run=lambda done: save_results(config, done, ROOT / "benchmarks" / "results" / f"{name}.json")
    )
    plot_comparison(config, results, ROOT / "docs" / "img" / f"{name}.png")
    print(format_comparison(config, results))


if __name__ == "__main__":
    main()
