"""Branch engines side by side: eSurge from injected snapshots, eSurge recomputing the prefix,
eSurge on an in-memory prefix-cache hit, and the dense engine.

    PYTHONPATH=. .venv/bin/python benchmarks/engine_bench.py [--states 8] [--k 8] [--tokens 32] [--rounds 3]
        [--shape task|qwen2-0.5b] [--tag NAME]

The same S snapshots (the arithmetic task's warmed-up policy: each prompt plus the first half of
its greedy response; ``--shape qwen2-0.5b``: a random Qwen2-0.5B-shaped model on the same
tokens, for accelerators: on CPU eSurge cannot compile head_dim 64, see docs/engines.md) each
get K branches of ``--tokens`` tokens at T = 1 (no EOS stop: every mode decodes as many tokens):
- ``dense``: `vinekv.replay.engines.VanillaEngine` (K dense copies of each prefix, one device loop);
- ``esurge_injected``: `vinekv.replay.engines.ESurgeEngine`: the stored KV written into eSurge's page
  pool as prefix-cache pages shared by the K branches; only the partial last page is prefilled;
- ``esurge_recompute``: a second eSurge with prefix caching off: each of the K requests
  prefills the whole prefix from its tokens;
- ``esurge_cache_hit``: eSurge with prefix caching on, the same requests run once before (the
  prefix pages computed by eSurge itself, in memory): the best case injection can reach.
Reported per mode: median seconds over ``--rounds`` (after a compile round), generated tokens/s,
prompt tokens prefilled, and peak KV pages held (eSurge) against what K copies would hold.
Results: benchmarks/results/engines[-TAG].json and docs/img/engines[-TAG].png.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODES = ("dense", "esurge_injected", "esurge_recompute", "esurge_cache_hit")


def snapshots(model, tokenizer, count: int):
    """``count`` single-row snapshots: a task prompt plus the first half of its greedy response."""
    from easydel.inference.sampling_params import SamplingParams

    from vinekv.kvstore import capture_state
    from vinekv.replay.sampler import generate_branches
    from vinekv.tasks.arithmetic import make_dataset

    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in make_dataset(count, seed=4242)["prompt"]]
    states = [capture_state(model, np.asarray([p], np.int32), len(p)) for p in prompts]
    greedy = generate_branches(model, states, SamplingParams(max_tokens=40, temperature=0.0), engine="vanilla")
    out = []
    for p, b in zip(prompts, greedy, strict=True):
        seq = np.asarray([p + b.tokens[0][: max(2, len(b.tokens[0]) // 2)].tolist()], np.int32)
        out.append(capture_state(model, seq, seq.shape[1]))
    return out


def run_requests(engine, states, k, params, tag):
    from vinekv.replay.engines import esurge_internals as internals

    names = [(f"{tag}{s}-{b}", st) for s, st in enumerate(states) for b in range(k)]
    peak = [0]

    def sample_pages() -> None:
        peak[0] = max(peak[0], internals.pages_in_use(engine))

    done = internals.run(engine, [internals.request(n, st.token_ids[0], params) for n, st in names], sample_pages)
    prefilled = sum(st.position - done[n].cached_tokens for n, st in names)
    return sum(len(d.tokens) for d in done.values()), prefilled, peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--states", type=int, default=8, help="snapshots (default 8)")
    parser.add_argument("--k", type=int, default=8, help="branches per snapshot (default 8)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per branch (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds after a compile round (default 3)")
    parser.add_argument("--shape", choices=["task", "qwen2-0.5b"], default="task", help="model (default task)")
    parser.add_argument("--page-size", type=int, default=16, help="eSurge page size (default 16)")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    args = parser.parse_args()
    quiet_logs()
    enable_compilation_cache()
    from easydel.inference.sampling_params import SamplingParams

    from vinekv.kvstore.dense_cache import kv_layout
    from vinekv.replay.engines import ESurgeEngine, ESurgeOptions, VanillaEngine
    from vinekv.replay.engines import esurge_internals as internals
    from vinekv.replay.engines.base import BranchSampling
    from vinekv.replay.sampler import branch_keys
    from vinekv.tasks.warmup import warm_up

    warmed = warm_up(progress=False)
    model, tokenizer = warmed.model, warmed.tokenizer
    states = snapshots(model, tokenizer, args.states)
    if args.shape == "qwen2-0.5b":
        import dataclasses

        import jax.numpy as jnp

        from vinekv.kvstore import capture_state
        from vinekv.models import QWEN2_0P5B_KV, build_model

        shape = dataclasses.replace(QWEN2_0P5B_KV, vocab_size=model.config.vocab_size)
        model = build_model("qwen2", shape, dtype=jnp.bfloat16, kv_dtype=jnp.bfloat16, seed=0)
        states = [capture_state(model, s.token_ids, s.position) for s in states]
    k, budgets = args.k, np.full(len(states), args.tokens)
    sampling = BranchSampling(k, 1.0, 0, 1.0, "esurge", eos_ids=frozenset(), stop_ids=frozenset())
    keys = branch_keys(0, [(i, 0) for i in range(len(states))], k)
    params = SamplingParams(max_tokens=args.tokens, temperature=1.0, top_p=1.0, top_k=0)
    max_len = max(s.position for s in states) + args.tokens + args.page_size
    options = ESurgeOptions(page_size=args.page_size, max_model_len=max_len, max_num_seqs=len(states) * k)
    dense = VanillaEngine(model, max_rows=len(states) * k)
    folder = tempfile.TemporaryDirectory(prefix="vinekv-engine-bench-")  # eSurge loads its tokenizer by path
    tokenizer.save_pretrained(folder.name)
    injected = ESurgeEngine(model, folder.name, options).start()
    recompute = internals.start(
        model, folder.name, page_size=args.page_size, page_budget_bytes=options.budget_bytes(),
        max_model_len=max_len, max_num_seqs=len(states) * k, prefix_caching=False,
    )  # fmt: skip
    seconds = {m: [] for m in MODES}
    facts: dict[str, dict] = {}
    try:
        for round_ in range(args.rounds + 1):
            timed = {}
            start = time.perf_counter()
            out = dense.expand(states, sampling, keys, budgets)
            timed["dense"] = time.perf_counter() - start
            facts["dense"] = {"tokens": int(sum(b.lengths.sum() for b in out)), "prefilled": len(states) * k}
            start = time.perf_counter()
            out = injected.expand(states, sampling, keys, budgets)
            timed["esurge_injected"] = time.perf_counter() - start
            facts["esurge_injected"] = {
                "tokens": int(sum(b.lengths.sum() for b in out)),
                "prefilled": injected.prefilled_tokens,
                "peak_pages": injected.peak_pages,
            }
            internals.reset_batch_state(recompute, jax.random.PRNGKey(round_))
            start = time.perf_counter()
            tokens, prefilled, peak = run_requests(recompute, states, k, params, f"r{round_}-")
            timed["esurge_recompute"] = time.perf_counter() - start
            facts["esurge_recompute"] = {"tokens": tokens, "prefilled": prefilled, "peak_pages": peak}
            engine = injected.esurge
            internals.reset_prefix_cache(engine)
            internals.reset_batch_state(engine, jax.random.PRNGKey(round_))
            run_requests(engine, states, 1, params, f"w{round_}-")  # eSurge computes the prefixes itself
            internals.reset_batch_state(engine, jax.random.PRNGKey(round_))
            start = time.perf_counter()
            tokens, prefilled, peak = run_requests(engine, states, k, params, f"h{round_}-")
            timed["esurge_cache_hit"] = time.perf_counter() - start
            facts["esurge_cache_hit"] = {"tokens": tokens, "prefilled": prefilled, "peak_pages": peak}
            print(f"round {round_}: " + ", ".join(f"{m} {s:.2f} s" for m, s in timed.items()), flush=True)
            if round_:  # round 0 compiles
                for m, s in timed.items():
                    seconds[m].append(s)
    finally:
        injected.close()
        internals.shutdown(recompute)
        folder.cleanup()
    layout = kv_layout(model)
    token_bytes = 2 * layout.num_layers * layout.num_kv_heads * layout.head_dim * np.dtype(layout.dtype).itemsize
    shared = [(s.position - 1) // args.page_size * args.page_size for s in states]  # injected, held once
    result = {
        "machine": platform.platform(),
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "args": vars(args),
        "prefix_tokens": [s.position for s in states],
        "median_seconds": {m: float(np.median(v)) for m, v in seconds.items()},
        "tokens_per_second": {m: facts[m]["tokens"] / float(np.median(v)) for m, v in seconds.items()},
        "facts": facts,
        "prefix_memory": prefix_memory([s.position for s in states], shared, k, token_bytes),
        "seconds": seconds,
    }
    suffix = f"-{args.tag}" if args.tag else ""
    (REPO / "benchmarks" / "results" / f"engines{suffix}.json").write_text(json.dumps(result, indent=1))
    plot(result, REPO / "docs" / "img" / f"engines{suffix}.png")
    for m in MODES:
        f = facts[m]
        print(
            f"{m:17s} {result['median_seconds'][m]:7.2f} s  {result['tokens_per_second'][m]:8.0f} tok/s  "
            f"prefilled {f['prefilled']:5d}  peak pages {f.get('peak_pages', '-')}"
        )
    mem = result["prefix_memory"]
    print(
        f"prefix KV for K={k}: eSurge {mem['esurge_prefix_bytes'] / 2**20:.2f} MiB (shared pages + prefilled rest) vs "
        f"{mem['dense_prefix_bytes'] / 2**20:.2f} MiB as K dense copies"
    )


def prefix_memory(positions: list[int], shared: list[int], k: int, token_bytes: int) -> dict[str, int]:
    """Bytes of prefix KV held while K branches of each state run: the dense engine holds K
    copies of every prefix; eSurge holds the injected full pages once and, per branch, the
    prefilled rest (partial page and last token)."""
    rest = sum(p - s for p, s in zip(positions, shared, strict=True))
    return {
        "token_bytes": token_bytes,
        "shared_tokens": sum(shared),
        "dense_prefix_bytes": token_bytes * k * sum(positions),
        "esurge_prefix_bytes": token_bytes * (sum(shared) + k * rest),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    rates = [result["tokens_per_second"][m] for m in MODES]
    left.bar(range(len(MODES)), rates, color=["#777", "#1b7837", "#c51b7d", "#4393c3"])
    left.set_xticks(range(len(MODES)), [m.replace("_", "\n") for m in MODES])
    left.set_ylabel("generated tokens / s")
    left.set_title(f"{result['args']['states']} states x K={result['args']['k']}, {result['backend']}")
    mem = result["prefix_memory"]
    sizes = [mem["dense_prefix_bytes"] / 2**20, mem["esurge_prefix_bytes"] / 2**20]
    right.bar([0, 1], sizes, color=["#777", "#1b7837"])
    right.set_xticks([0, 1], ["dense: K copies", "eSurge: shared pages\n+ K x partial page"])
    right.set_ylabel("prefix KV (MiB)")
    right.set_title("prefix memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
