"""Policies and reward functions named by spec strings, as the CLI and Ray replay workers take them.

A spec is a string so that a process that cannot receive the object (a Ray actor on another
host) builds the same policy or reward function from it.
"""

from __future__ import annotations

from typing import Any

from vinekv.replay.ray_replay import load_object


def load_model(spec: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a policy spec: ``tiny[:family[:seed]]`` (built-in random model,
    byte tokenizer), ``task`` (the arithmetic task's warmed-up policy), ``task:DIR`` (the newest
    checkpoint of a `vinekv train --output DIR` job) or ``module:factory`` returning the pair."""
    if spec == "tiny" or spec.startswith("tiny:"):
        from vinekv.models import build_model, build_tokenizer

        _, family, seed = (spec.split(":") + ["llama", "0"])[:3]
        return build_model(family, seed=int(seed)), build_tokenizer()
    if spec == "task":
        from vinekv.tasks.warmup import warm_up

        warmed = warm_up()
        return warmed.model, warmed.tokenizer
    if spec.startswith("task:"):
        from vinekv.train import load_policy

        return load_policy(spec.removeprefix("task:"))
    return load_object(spec)()


def load_reward(spec: str) -> Any:
    """``letters`` (the demo's toy), ``task`` (the arithmetic verifier) or ``module:function``."""
    if spec == "letters":
        from vinekv.demo import letter_fraction

        return letter_fraction
    if spec == "task":
        from vinekv.tasks.arithmetic import reward

        return reward
    return load_object(spec)
