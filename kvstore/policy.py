"""The stale-policy check: data made by one policy refused by another unless asked for.

Pure Python (no JAX): the store imports it. Fingerprints come from `vinekv.kvstore.fingerprint`.
"""

from __future__ import annotations


class StalePolicyError(ValueError):
    """A snapshot or trajectory was made by another policy than the model asked to consume it."""


def check_policy(made_by: str, current: str, what: str, remedy: str = "pass allow_stale=True to use it anyway") -> None:
    """Raises `StalePolicyError` naming ``what`` unless fingerprint ``made_by`` is ``current``."""
    if made_by != current:
        raise StalePolicyError(
            f"{what} was made by policy {made_by}, but the model is {current} (another policy: weights or "
            f"architecture changed); {remedy}"
        )
