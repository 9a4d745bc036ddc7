"""Step splitting cost: `vinekv.replay.text.text_offsets` (linear, windowed decoding) against decoding
every prefix of the response (the former, quadratic rule), on 4096-token responses.

    PYTHONPATH=. .venv/bin/python benchmarks/text_offsets_bench.py

Both run side by side in one process on the byte-level tokenizer (one token per byte) and a BPE
tokenizer trained here on arithmetic text (multi-character tokens); the offsets are checked
equal. Results: benchmarks/results/text_offsets.json.
"""

from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path

import numpy as np

from vinekv.models import build_bpe_tokenizer, build_tokenizer
from vinekv.replay.text import prefix_ends, text_offsets

TOKENS = 4096


def arithmetic_corpus() -> list[str]:
    rng = random.Random(0)
    pairs = [(rng.randint(1, 99), rng.randint(1, 99)) for _ in range(400)]
    return [f"{a}+{b}={a + b}\nthen x2\n#### {2 * (a + b)}\n\n" for a, b in pairs]


def main() -> None:
    corpus = "\n".join(arithmetic_corpus())
    bpe, byte = build_bpe_tokenizer(arithmetic_corpus()), build_tokenizer()
    rows = []
    for name, tok, text in (("byte-level", byte, corpus), ("bpe", bpe, corpus * 4)):
        ids = tok.encode(text, add_special_tokens=False)[:TOKENS]
        assert len(ids) == TOKENS
        start = time.perf_counter()
        _, offsets = text_offsets(tok, ids)
        linear = time.perf_counter() - start
        start = time.perf_counter()
        ends = np.maximum.accumulate(prefix_ends(tok, ids))
        quadratic = time.perf_counter() - start
        assert [e for _, e in offsets] == ends.tolist()
        rows.append({"tokenizer": name, "tokens": TOKENS, "linear_s": linear, "prefix_decoding_s": quadratic})
        print(
            f"{name:10s} {TOKENS} tokens: linear {linear * 1e3:.1f} ms, every prefix {quadratic:.2f} s "
            f"({quadratic / linear:.0f}x), offsets equal"
        )
    out = Path(__file__).parent / "results" / "text_offsets.json"
    out.write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
