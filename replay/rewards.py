"""Scoring branches with reward functions of the signature EasyDeL/TRL users know.

A reward function is called as ``fn(prompts=[...], completions=[...], **kwargs)`` and returns one
float per completion; each kwarg is a list aligned with the completions, carrying per-trajectory
fields stored with the rollout (a gold answer, say). A function gets only the keyword arguments
it declares, all of them when it takes ``**kwargs`` (`accepted_kwargs`). Identical (prompt, completion, fields)
items are scored once.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

RewardFn = Callable[..., Sequence[float]]


@functools.cache
def _parameters(fn: Callable[..., Any]) -> tuple[frozenset[str], frozenset[str], bool]:
    """(accepted names, required names, takes **kwargs) of ``fn``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): pass everything
        return frozenset(), frozenset(), True
    named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY)]
    required = frozenset(p.name for p in named if p.default is p.empty)
    return frozenset(p.name for p in named), required, any(p.kind == p.VAR_KEYWORD for p in params)


def accepted_kwargs(fn: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``kwargs`` that ``fn`` accepts (all of them when it takes ``**kwargs``).

    Raises a `TypeError` naming the convention when ``fn`` requires an argument that is not
    given: reward functions are called by keyword, ``fn(prompts=..., completions=..., **fields)``.
    """
    try:
        names, required, takes_any = _parameters(fn)
    except TypeError:  # unhashable callable
        names, required, takes_any = _parameters.__wrapped__(fn)
    missing = sorted(required - set(kwargs))
    if missing:
        name = getattr(fn, "__name__", type(fn).__name__)
        raise TypeError(
            f"reward function {name!r} requires {missing}, which is not given: reward functions are called by "
            f"keyword as fn(prompts=[...], completions=[...], **fields) with one list per dataset column or stored "
            f"field ({sorted(kwargs)} here); write e.g. `def {name}(prompts, completions, **fields)`"
        )
    return dict(kwargs) if takes_any else {k: v for k, v in kwargs.items() if k in names}


def score(
    reward_fns: RewardFn | Sequence[RewardFn],
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: Sequence[Mapping[str, Any]],
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """Weighted sum of the reward functions for each item; returns float64 ``[items]``."""
    fns = [reward_fns] if callable(reward_fns) else list(reward_fns)
    if not fns:
        raise ValueError("no reward functions given")
    weights = [1.0] * len(fns) if weights is None else list(weights)
    if len(weights) != len(fns):
        raise ValueError(f"{len(weights)} weights for {len(fns)} reward functions")
    if not len(prompts) == len(completions) == len(fields):
        raise ValueError("prompts, completions and fields must have one entry per item")
    keys: dict[tuple[str, str, str], int] = {}
    unique, index = [], []
    for prompt, completion, extra in zip(prompts, completions, fields, strict=True):
        key = (prompt, completion, json.dumps(extra, sort_keys=True, default=str))
        if key not in keys:
            keys[key] = len(unique)
            unique.append((prompt, completion, extra))
        index.append(keys[key])
    field_names = sorted({name for extra in fields for name in extra})
    kwargs = {name: [extra.get(name) for _, _, extra in unique] for name in field_names}
    total = np.zeros(len(unique))
    for fn, weight in zip(fns, weights, strict=True):
        call = {"prompts": [k[0] for k in unique], "completions": [k[1] for k in unique], **kwargs}
        values = fn(**accepted_kwargs(fn, call))
        values = np.asarray(list(values), dtype=np.float64)
        if values.shape != (len(unique),):
            got = values.shape[0] if values.ndim else "a scalar"
            name = getattr(fn, "__name__", fn)
            raise ValueError(f"reward function {name!r} returned {got} values for {len(unique)} completions")
        total += weight * values
    return total[np.asarray(index, dtype=np.int64)]


def weighted_sum(reward_fns: Sequence[RewardFn], weights: Sequence[float]) -> RewardFn:
    """One reward function returning ``sum_i weights[i] * reward_fns[i](...)`` per completion."""
    fns, weights = list(reward_fns), [float(w) for w in weights]
    if len(fns) != len(weights) or not fns:
        raise ValueError(f"{len(weights)} weights for {len(fns)} reward functions")

    def combined(prompts: Sequence[str], completions: Sequence[str], **fields: Any) -> list[float]:
        total = np.zeros(len(completions))
        for fn, weight in zip(fns, weights, strict=True):
            call = accepted_kwargs(fn, {"prompts": prompts, "completions": completions, **fields})
            values = np.asarray(list(fn(**call)), dtype=np.float64)
            if values.shape != total.shape:
                name = getattr(fn, "__name__", fn)
                raise ValueError(f"reward function {name!r} returned {values.size} values for {total.size} completions")
            total += weight * values
        return total.tolist()

    combined.__name__ = "+".join(getattr(fn, "__name__", type(fn).__name__) for fn in fns)
    return combined
