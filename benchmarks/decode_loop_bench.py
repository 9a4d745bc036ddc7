"""The dense engine's decode loop on the device vs a token-by-token host loop, side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/decode_loop_bench.py [--rows 64] [--tokens 40] [--rounds 5]

Both decode the same rows from the same prefilled cache with the same keys (the arithmetic
task's warmed-up policy, branches sampled at T = 1 until EOS or the budget):
- ``device``: `vinekv.replay.decode.decode_rows`, one jitted ``lax.while_loop`` (sample, forward, stop
  checks on the device; one transfer at the end);
- ``host``: the loop vinekv ran before: a jitted sample-then-forward step per token, the
  sampled tokens copied to the host after every step and each row's end checked in Python.
Tokens are checked identical; reported: medians over ``--rounds`` of tokens/s (rows x steps
run) and the ratio. Results: benchmarks/results/decode_loop.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

import jax  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def host_loop(model, cache, logits, budgets, keys, sampling, eos_ids) -> tuple[np.ndarray, np.ndarray, int]:
    """``(tokens [rows, max budget], lengths [rows], steps run)`` of the per-token host loop."""
    from vinekv.kvstore.dense_cache import forward_split
    from vinekv.replay.decode import sample_tokens

    def step(graphdef, graphstate, graphother, cache, logits, keys):
        tok, _ = sample_tokens(logits, keys, cache.views[0].indexs, *sampling)
        new_logits, cache = forward_split(graphdef, graphstate, graphother, cache, tok[:, None])
        return tok, new_logits[:, -1], cache

    jitted = jax.jit(step, static_argnums=(0,))
    graphdef, graphstate, graphother = model.split_module()
    rows, steps = len(budgets), int(budgets.max())
    tokens, lengths, done = np.zeros((rows, steps), np.int32), budgets.copy(), np.zeros(rows, bool)
    with model.mesh:
        for i in range(steps):
            tok, logits, cache = jitted(graphdef, graphstate, graphother, cache, logits, keys)
            tokens[:, i] = jax.device_get(tok)
            for r in range(rows):
                if not done[r] and tokens[r, i] in eos_ids:
                    lengths[r] = i + 1
                done[r] |= tokens[r, i] in eos_ids or i + 1 >= budgets[r]
            if done.all():
                return tokens, lengths, i + 1
    return tokens, lengths, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows decoded together (default 64)")
    parser.add_argument("--tokens", type=int, default=40, help="token budget per row (default 40)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after a warm-up round (default 5)")
    args = parser.parse_args()
    quiet_logs()
    enable_compilation_cache()
    from vinekv.replay.decode import Sampling, decode_rows, prefill, row_keys_for
    from vinekv.replay.sampler import eos_token_ids
    from vinekv.tasks.arithmetic import make_dataset
    from vinekv.tasks.warmup import warm_up

    warmed = warm_up(progress=False)
    model, tokenizer = warmed.model, warmed.tokenizer
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in make_dataset(args.rows, seed=4242)["prompt"]]
    lens = np.array([len(p) for p in prompts])
    ids = np.full((args.rows, lens.max()), tokenizer.pad_token_id, np.int32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    keys = row_keys_for(3, args.rows)
    budgets = np.full(args.rows, args.tokens, np.int32)
    eos = sorted(eos_token_ids(model, tokenizer))
    sampling = Sampling(temperature=1.0)
    max_length = int(lens.max()) + args.tokens

    def fresh():
        cache, logits = prefill(model, ids, lens, max_length=max_length)
        return jax.block_until_ready((cache, logits))

    seconds = {"device": [], "host": []}
    rates = {"device": [], "host": []}
    for round_ in range(args.rounds + 1):
        cache, logits = fresh()
        start = time.perf_counter()
        out = decode_rows(model, cache, logits, budgets, keys, sampling, eos_ids=eos)
        device_s = time.perf_counter() - start
        cache, logits = fresh()
        start = time.perf_counter()
        tokens, lengths, steps = host_loop(model, cache, logits, budgets, keys, dataclasses.astuple(sampling), eos)
        host_s = time.perf_counter() - start
        assert out.lengths.tolist() == lengths.tolist()
        for r in range(args.rows):
            np.testing.assert_array_equal(out.tokens[r, : lengths[r]], tokens[r, : lengths[r]])
        if round_:  # the first round compiles
            for name, s in (("device", device_s), ("host", host_s)):
                seconds[name].append(s)
                rates[name].append(args.rows * steps / s)
        print(f"round {round_}: device {device_s:.3f} s, host {host_s:.3f} s, {steps} steps", flush=True)
    median = {k: float(np.median(v)) for k, v in rates.items()}
    result = {
        "machine": platform.platform(),
        "backend": jax.default_backend(),
        "args": vars(args),
        "steps": steps,
        "tokens_per_second": median,
        "device_over_host": median["device"] / median["host"],
        "seconds": seconds,
    }
    (REPO / "benchmarks" / "results" / "decode_loop.json").write_text(json.dumps(result, indent=1))
    print(
        f"{args.rows} rows x {steps} steps: device loop {median['device']:.0f} tokens/s, host loop "
        f"{median['host']:.0f} tokens/s ({result['device_over_host']:.2f}x); tokens identical"
    )


if __name__ == "__main__":
    main()
