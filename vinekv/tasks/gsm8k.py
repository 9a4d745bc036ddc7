"""GSM8K-format data, final-answer extraction and an exact-match reward (MATH-style answers via math-verify).

Data format: JSONL, one object per line with string fields ``question`` and ``answer``; the answer is
a worked solution whose ``#### <number>`` line (GSM8K puts it last) states the final answer. Empty
lines are skipped. :func:`load_jsonl` turns a file into ``prompt``/``answer`` columns, the answer
being the final number as a normalised string.

Extraction (:func:`extract_answer`), by priority: the last ``#### x``; else the last ``\\boxed{x}``
(nested braces allowed); else the last "the answer is x" (case-insensitive, "final" and ``:``
optional); else the last number in the text; else None. After ``####`` and "the answer is" the
answer runs to the end of its line or sentence (a box in it gives its content); a number followed by
words or punctuation (``72 apples``, ``18, so``) gives the number.

Normalisation (:func:`normalize_answer`): ``$``, ``\\$`` and the ``\\( \\) \\[ \\]`` delimiters,
surrounding ``*`` (markdown bold), surrounding whitespace and a trailing ``.`` are dropped. A plain
number (optional sign, integer part with or without ``,`` thousands groups, LaTeX ``{,}`` counting
as ``,``, optional decimals) is written canonically: no commas, no leading ``+`` or zeros, no
trailing decimal zeros (``+1,000.50`` -> ``1000.5``, ``5.0`` -> ``5``, ``-0`` -> ``0``). Anything
else (``3/4``, ``\\frac{1}{2}``, ``2\\pi``) is kept as written, with whitespace removed except a
single space between two letters (``3 / 4`` -> ``3/4``, ``\\pi r`` kept).

Reward (:func:`reward`): 1.0 when the extracted answer equals the gold answer; when both are plain
numbers they are compared as canonical strings, otherwise with ``math_verify.verify`` on both
answers parsed as LaTeX (``\\frac{1}{2}`` == ``0.5``; note math-verify also accepts ``5%`` for
``5``). No answer, or no match, is 0.0.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Sequence
from itertools import chain
from pathlib import Path
from typing import Any

from datasets import Dataset

_NUM = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+"
_PLAIN_NUMBER = re.compile(rf"[-+]?(?:{_NUM})")
# In running text a sign counts only where it cannot be a binary minus/plus ("5-3" -> 5, 3).
_TEXT_NUMBER = re.compile(rf"(?:(?<![\w)\]}}])[-+])?\$?(?:{_NUM})")
# A number that ends the answer: followed by the end, words ("72 apples") or punctuation ("18, so").
_LEADING_NUMBER = re.compile(rf"[-+]?(?:{_NUM})(?=$|\s+[A-Za-z]|[,;:!?.](?:\s|$))")
_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS = re.compile(r"\bthe\s+(?:final\s+)?answer\s+is\b[ \t]*:?[ \t]*([^\n]*)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_BOXED = re.compile(r"\\boxed\s*\{")
_SPACE_NOT_BETWEEN_LETTERS = re.compile(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])")
_DELIMITERS = ("\\$", "$", "\\(", "\\)", "\\[", "\\]")
_MATH_VERIFY_TIMEOUT_S = 5


def _canonical_number(text: str) -> str:
    """A plain number (``_PLAIN_NUMBER``) written canonically: ``+1,000.50`` -> ``1000.5``."""
    text = text.replace(",", "").lstrip("+")
    sign = "-" if text.startswith("-") else ""
    whole, _, fraction = text.lstrip("-").partition(".")
    whole, fraction = whole.lstrip("0") or "0", fraction.rstrip("0")
    number = f"{whole}.{fraction}" if fraction else whole
    return number if number == "0" else sign + number


def is_number(text: str) -> bool:
    """Whether ``text`` is a plain number in canonical or thousands-comma form (``-1,234.5``)."""
    return _PLAIN_NUMBER.fullmatch(text) is not None


def _clean(text: str) -> str:
    """``text`` without math delimiters, surrounding ``*``, extra whitespace or a sentence-ending ``.``."""
    for delimiter in _DELIMITERS:
        text = text.replace(delimiter, "")
    return " ".join(text.replace("{,}", ",").split()).strip("*").rstrip(".").strip()


def _squeeze(text: str) -> str:
    """``text`` without whitespace, except single spaces between two letters (``\\pi r``, ``x y``)."""
    return _SPACE_NOT_BETWEEN_LETTERS.sub("", text)


def normalize_answer(text: str) -> str:
    """``text`` as a comparable answer string (rules in the module docstring)."""
    text = _clean(text)
    return _canonical_number(text) if is_number(text) else _squeeze(text)


def _answer_from(segment: str, *, cut_sentence: bool) -> str | None:
    """The answer stated by ``segment`` (what follows ``####``/"the answer is", or a box's content)."""
    if cut_sentence:
        segment = _SENTENCE_END.split(segment, maxsplit=1)[0]
    text = _clean(segment)
    boxes = _boxed_contents(text)  # "#### \\boxed{5}"
    text = _clean(boxes[-1]) if boxes else text
    leading = _LEADING_NUMBER.match(text)
    return _canonical_number(leading.group()) if leading else _squeeze(text) or None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every balanced ``\\boxed{...}`` in ``text``, in order (nested braces kept)."""
    contents = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                contents.append(text[start:i])
                break
    return contents


def extract_answer(text: str) -> str | None:
    """A completion's final answer, normalised, or None when it states none (priorities in the module docstring)."""
    candidates = chain(
        (_answer_from(m.group(1), cut_sentence=True) for m in reversed(list(_HASHES.finditer(text)))),
        (_answer_from(c, cut_sentence=False) for c in reversed(_boxed_contents(text))),
        (_answer_from(m.group(1), cut_sentence=True) for m in reversed(list(_ANSWER_IS.finditer(text)))),
        (normalize_answer(m.group()) for m in reversed(list(_TEXT_NUMBER.finditer(text)))),
    )
    return next((c for c in candidates if c), None)


def gold_answer(solution: str) -> str | None:
    """The normalised final answer of a GSM8K solution (its last ``#### x`` line), or None."""
    lines = [line.strip() for line in solution.splitlines()]
    finals = [normalize_answer(line[4:]) for line in lines if line.startswith("####")]
    return finals[-1] if finals and finals[-1] else None


def parse_record(line: str, where: str) -> tuple[str, str]:
    """``(question, final answer)`` of one JSONL line; ``ValueError`` naming ``where`` when malformed."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(record).__name__}")
    missing = [key for key in ("question", "answer") if key not in record]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(map(repr, missing))}")
    question, solution = record["question"], record["answer"]
    if not isinstance(question, str) or not isinstance(solution, str):
        raise ValueError(f"{where}: 'question' and 'answer' must be strings")
    final = gold_answer(solution)
    if final is None:
        raise ValueError(f"{where}: answer has no '#### <number>' line")
    return question, final


def load_jsonl(path: str | os.PathLike[str], *, prompt_template: str = "{question}") -> Dataset:
    """A GSM8K-format JSONL file as a ``Dataset`` with ``prompt`` (``prompt_template`` formatted with
    ``question``) and ``answer`` (normalised final number) columns; ``ValueError`` naming the file
    and line for malformed lines, or when the file has no examples."""
    path = Path(path)
    prompts, answers = [], []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                question, final = parse_record(line, f"{path}, line {lineno}")
                prompts.append(prompt_template.format(question=question))
                answers.append(final)
    if not prompts:
        raise ValueError(f"{path}: no examples")
    return Dataset.from_dict({"prompt": prompts, "answer": answers})


def _math_verify_equal(gold: str, predicted: str) -> bool:
    """``math_verify.verify`` on both answers parsed as LaTeX. Its timeouts use ``SIGALRM``, which
    only works in the main thread, so other threads run without them."""
    from math_verify import parse, verify

    timeout = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    predicted_parsed = parse(f"${predicted}$", parsing_timeout=timeout)
    return bool(gold_parsed and predicted_parsed and verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))


def is_correct(completion: str, gold: str) -> bool:
    """Whether ``completion``'s extracted answer equals ``gold`` (module docstring: Reward)."""
    predicted, gold = extract_answer(completion), normalize_answer(str(gold))
    if predicted is None or not gold:
        return False
    if is_number(predicted) and is_number(gold):
        return predicted == gold
    return predicted == gold or _math_verify_equal(gold, predicted)


def _completion_text(completion: str | Sequence[dict[str, Any]]) -> str:
    """A completion's text; conversational completions (a list of messages) give the last message's content."""
    if isinstance(completion, str):
        return completion
    return str(completion[-1]["content"]) if completion else ""


def reward(
    prompts: Sequence[Any], completions: Sequence[str | Sequence[dict[str, Any]]], answer: Sequence[Any], **kwargs: Any
) -> list[float]:
    """1.0 per completion whose final answer equals its gold ``answer``, else 0.0 (EasyDeL reward signature)."""
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions for {len(answer)} answers")
    return [float(is_correct(_completion_text(c), str(a))) for c, a in zip(completions, answer, strict=True)]
