"""Dataset rows to reward functions: every completion is scored with its prompt's dataset row.

EasyDeL/TRL reward functions take the dataset's columns as keyword arguments (``answer`` for
GSM8K-style data). EasyDeL 0.3.0's GRPO pipeline keeps only tokenized fields, so the trainer
numbers the rows (column ``vinekv_row``, kept through tokenization by `KeepRowTransform`),
looks each batch prompt's row up on the host, and hands every column but the prompt to the
reward functions: GRPO's own scoring (through `FieldInjector`), the rollouts', and the branches'.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from easydel.trainers.prompt_transforms import GRPOPreprocessTransform

from vinekv.replay.rewards import accepted_kwargs

logger = logging.getLogger(__name__)

ROW_COLUMN = "vinekv_row"
# Columns that are the prompt itself or the trainer's tokenization, not task fields.
NOT_FIELDS = frozenset({"prompt", ROW_COLUMN, "input_ids", "attention_mask"})


def with_row_index(dataset: Any) -> Any:
    """``dataset`` with an int column ``vinekv_row`` = row index (None stays None)."""
    if dataset is None or ROW_COLUMN in getattr(dataset, "column_names", ()):
        return dataset
    if not hasattr(dataset, "map") or not hasattr(dataset, "__getitem__"):
        logger.warning(
            "%s is not a `datasets.Dataset`: its columns will not reach the reward functions", type(dataset).__name__
        )
        return dataset
    return dataset.map(lambda _, index: {ROW_COLUMN: index}, with_indices=True)


def row_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    """The task fields of a dataset row: every column except the prompt and tokenization."""
    return {k: v for k, v in row.items() if k not in NOT_FIELDS}


class KeepRowTransform(GRPOPreprocessTransform):
    """GRPO's prompt tokenization, keeping the ``vinekv_row`` index of each example."""

    def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
        out = super().__call__(example)
        out[ROW_COLUMN] = example[ROW_COLUMN]
        return out


class KeepsRowIndex:
    """Mixin for an EasyDeL GRPO-style trainer (listed before it in the bases): its prompt
    tokenization keeps each example's ``vinekv_row`` (`KeepRowTransform`); pre-tokenized datasets
    (no transform) keep their integer columns as they are."""

    def _get_preprocess_transform(self) -> Any:
        if super()._get_preprocess_transform() is None:
            return None
        return KeepRowTransform(
            tokenizer=self.processing_class,
            max_prompt_length=self.arguments.max_prompt_length,
            tools=getattr(self.arguments, "tools", None),
            skip_apply_chat_template=self.arguments.skip_apply_chat_template,
        )


class FieldInjector:
    """Holds the current batch's per-completion fields and wraps reward functions to receive them.

    EasyDeL calls a reward function with ``prompts``, ``completions`` and its own extras; the
    wrapped function also gets one list per task field, aligned with the completions, keeping
    only the arguments it accepts (all of them when it takes ``**kwargs``).
    """

    def __init__(self) -> None:
        self.fields: Sequence[Mapping[str, Any]] = ()

    def columns(self, count: int) -> dict[str, list[Any]]:
        """``{field: [value per completion]}`` when ``count`` completions match the batch."""
        if len(self.fields) != count:
            return {}
        names = sorted({name for f in self.fields for name in f})
        return {name: [f.get(name) for f in self.fields] for name in names}

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def with_fields(**kwargs: Any) -> Any:
            merged = {**self.columns(len(kwargs.get("completions", ()))), **kwargs}
            return fn(**accepted_kwargs(fn, merged))

        with_fields.__name__ = getattr(fn, "__name__", type(fn).__name__)
        with_fields.__wrapped__ = fn
        return with_fields
