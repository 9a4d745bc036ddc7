"""A synthetic multi-step arithmetic task where steps matter, with an exact verifier.

A prompt defines a chain of single-letter variables, each from the previous one by one
operation, and asks for the last::

    a=4;b=a+1;c=b*0;d=c-8;d=?\\n

The response writes one intermediate result per line and ends with the answer::

    b=5
    c=0
    d=-8
    #### -8

so a response is a sequence of reasoning steps (one per line, VinePPO's ``"\\n"`` delimiter)
whose final line alone is graded: reward 1 when the number after the last ``####`` equals the
answer, else 0. Difficulty knobs: the number of operations (``steps``) and the operand range
(``operand_max``). The task has its own character tokenizer (`build_task_tokenizer`): one
token per character of ``ALPHABET`` plus ``<|pad|>`` and ``<|eos|>``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PAD_TOKEN, EOS_TOKEN = "<|pad|>", "<|eos|>"
VARIABLES = "abcdefgh"
ALPHABET = "0123456789" + VARIABLES + "=+-*;?# \n"
OPERATIONS = "+-*"
MAX_STEPS = len(VARIABLES) - 1
_ANSWER = re.compile(r"####\s*(-?\d+)\s*$")


def make_problem(rng: random.Random, steps: int, operand_max: int = 9) -> tuple[str, str, str]:
    """One problem: ``(prompt, solution, answer)``; ``solution`` is the reference response
    (without EOS), ``answer`` the final value as a string."""
    if not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {steps}")
    if operand_max < 1:
        raise ValueError(f"operand_max must be >= 1, got {operand_max}")
    value = rng.randint(0, operand_max)
    definitions, lines = [f"a={value}"], []
    for i in range(1, steps + 1):
        op, operand = rng.choice(OPERATIONS), rng.randint(0, operand_max)
        value = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        definitions.append(f"{VARIABLES[i]}={VARIABLES[i - 1]}{op}{operand}")
        lines.append(f"{VARIABLES[i]}={value}")
    prompt = ";".join(definitions) + f";{VARIABLES[steps]}=?\n"
    return prompt, "\n".join([*lines, f"#### {value}"]), str(value)


def make_dataset(n: int, seed: int = 0, steps: tuple[int, int] = (2, 4), operand_max: int = 9) -> Any:
    """``n`` problems as a `datasets.Dataset` with columns ``prompt``, ``answer`` and
    ``solution``; the number of operations is drawn uniformly from ``steps`` (inclusive)."""
    from datasets import Dataset

    low, high = steps
    if n < 1 or not 1 <= low <= high:
        raise ValueError(f"need n >= 1 and 1 <= steps[0] <= steps[1], got n={n}, steps={steps}")
    rng = random.Random(seed)
    rows = [make_problem(rng, rng.randint(low, high), operand_max) for _ in range(n)]
    return Dataset.from_dict(
        {"prompt": [r[0] for r in rows], "solution": [r[1] for r in rows], "answer": [r[2] for r in rows]}
    )


def final_answer(completion: str) -> str | None:
    """The integer after ``####`` on the completion's last non-empty line, or None."""
    lines = [line for line in completion.strip().split("\n") if line.strip()]
    if not lines:
        return None
    match = _ANSWER.search(lines[-1].strip())
    return None if match is None else str(int(match.group(1)))


def reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1.0 where the completion's final ``#### x`` line states the answer exactly, else 0.0."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions for {len(answer)} answers")
    return [float(final_answer(c) == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def build_task_tokenizer(save_dir: str | Path | None = None) -> Any:
    """The task's character tokenizer (``PreTrainedTokenizerFast``, left padding): ids 0 and 1
    are ``<|pad|>`` and ``<|eos|>``, then one id per character of ``ALPHABET``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1, **{ch: i + 2 for i, ch in enumerate(ALPHABET)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD_TOKEN))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, padding_side="left"
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def vocab_size() -> int:
    """Token ids of the task tokenizer, rounded up to a multiple of 4 (the model's vocabulary)."""
    return -(-(len(ALPHABET) + 2) // 4) * 4
