"""Branch engines behind one interface (`BranchEngine`): ``vanilla`` (dense cache, one on-device
decode loop per batch) and ``esurge`` (EasyDeL's paged engine, snapshots injected as prefix-cache
pages). `open_engine` resolves ``auto`` and says why it chose what it chose.
"""

from __future__ import annotations

import logging
from typing import Any

import jax

from vinekv.replay.engines.base import BranchEngine, Branches, BranchSampling, cut_at_stop_strings
from vinekv.replay.engines.esurge import CPU_PAGE_BUDGET_MB, ESurgeEngine, ESurgeOptions
from vinekv.replay.engines.esurge_internals import ESurgeUnavailable
from vinekv.replay.engines.vanilla import DEFAULT_MAX_ROWS, VanillaEngine

logger = logging.getLogger(__name__)

ENGINES = ("auto", "vanilla", "esurge")

__all__ = [
    "CPU_PAGE_BUDGET_MB",
    "DEFAULT_MAX_ROWS",
    "ENGINES",
    "BranchEngine",
    "BranchSampling",
    "Branches",
    "ESurgeEngine",
    "ESurgeOptions",
    "ESurgeUnavailable",
    "VanillaEngine",
    "cut_at_stop_strings",
    "open_engine",
]


def open_engine(
    engine: str,
    model: Any,
    *,
    tokenizer: Any = None,
    max_rows: int = DEFAULT_MAX_ROWS,
    esurge_options: ESurgeOptions | None = None,
    auto_on_cpu: bool = False,
) -> BranchEngine:
    """A started branch engine.

    ``auto`` is eSurge where it can start, else ``vanilla`` with the reason logged at INFO:
    the model's attention is not servable from injected pages, eSurge's internals are missing
    or it failed to start, or the backend is a CPU and ``auto_on_cpu`` is off (there the dense
    loop is the faster engine: docs/benchmarks.md, "Branch engines").

    Args:
      engine: ``"auto"`` | ``"vanilla"`` | ``"esurge"``.
      model: the policy.
      tokenizer: a tokenizer or its folder (eSurge only).
      max_rows: rows decoded together (vanilla) / eSurge's ``max_num_seqs`` unless
        ``esurge_options`` sets it.
      esurge_options: eSurge sizing; default `ESurgeOptions` with ``max_num_seqs=max_rows``.
      auto_on_cpu: let ``auto`` pick eSurge on a CPU backend too.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    options = esurge_options or ESurgeOptions(max_num_seqs=max_rows)
    if engine == "vanilla":
        return VanillaEngine(model, max_rows).start()
    if engine == "esurge":
        return ESurgeEngine(model, tokenizer, options).start()
    reason = None
    if jax.default_backend() == "cpu" and not auto_on_cpu:
        reason = "CPU backend: the dense loop is faster than eSurge here"
    else:
        try:
            return ESurgeEngine(model, tokenizer, options).start()
        except ESurgeUnavailable as err:
            reason = str(err)
        except Exception as err:  # noqa: BLE001 - any failed start falls back, with its reason
            reason = f"eSurge failed to start: {err!r}"
    logger.info("engine 'auto' -> 'vanilla': %s", reason)
    return VanillaEngine(model, max_rows).start()
