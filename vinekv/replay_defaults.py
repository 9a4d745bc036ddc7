"""`vinekv replay`'s settings from what the rollout recorded in its run.

A run's `RolloutRecipe` says how its rollouts were sampled (horizon, sampling) and, when known,
with which policy and reward. Branches must sample like the rollouts for their returns to be the
rollouts' values, so those settings come from the recipe; an option that contradicts it is
refused. The policy and reward specs are defaults an option may replace (a later checkpoint of
the same policy, another scorer); the policy fingerprint still refuses another policy's snapshots.
"""

from __future__ import annotations

from typing import Any

from vinekv.replay.config import RECIPE_SAMPLING, RolloutRecipe

# The recipe's settings `vinekv replay` has an option for, and the option (stop ids have none).
SAMPLING_OPTIONS = {name: "--" + name.replace("_", "-") for name in RECIPE_SAMPLING if name != "stop_token_ids"}
FALLBACK = {  # what a run without a recipe (made before recipes, or by the Python API) gets
    "horizon": None,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "sampler": "generate",
    "stop_token_ids": (),
    "model": "tiny",
    "reward": "letters",
}


def replay_settings(given: dict[str, Any], recipe: RolloutRecipe | None, run: str) -> tuple[dict[str, Any], list[str]]:
    """``(settings, recorded)``: each of `FALLBACK`'s settings, from ``given`` (the options set,
    None where not), else the ``recipe``, else the fallback; ``recorded`` names those taken from
    the recipe. ``ValueError`` naming the option for a sampling option that contradicts the recipe."""
    settings, recorded = {}, []
    for name in FALLBACK:
        value = given.get(name)
        stored = None if recipe is None else getattr(recipe, name if name != "model" else "policy")
        if name in SAMPLING_OPTIONS and value is not None and stored is not None and value != stored:
            raise ValueError(
                f"{SAMPLING_OPTIONS[name]} {value} contradicts run {run!r}: its rollouts were sampled with "
                f"{name} {stored!r} (recorded in the run), and branches must sample like them; leave the option out"
            )
        if value is None and stored is not None and (name != "stop_token_ids" or stored):
            value = stored
            recorded.append(name)
        settings[name] = FALLBACK[name] if value is None else value
    return settings, recorded
