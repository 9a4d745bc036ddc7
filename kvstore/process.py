"""Process-level helpers the store needs and the rest of vinekv shares (`vinekv.runtime`
re-exports them): quiet XLA logs, and returning freed C-heap memory to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os


def silence_xla_logs() -> None:
    """Hides XLA's C++ log lines and EasyDeL's INFO lines unless the user set
    TF_CPP_MIN_LOG_LEVEL / LOGGING_LEVEL_ED.

    Call before jax is imported. Loading cached CPU programs makes XLA print a screenful of
    "Target machine feature +prefer-no-gather is not supported" per program: tuning flags of
    the compile host, harmless when the cache was written on this machine.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # EasyDeL's loggers read their level from LOGGING_LEVEL_ED when created (per-step INFO
    # lines such as "No eSurge engines found to pause"); warnings and errors still show.
    os.environ.setdefault("LOGGING_LEVEL_ED", "WARNING")


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


def release_free_memory() -> None:
    """Returns the C heap's free memory to the OS (glibc ``malloc_trim(0)``; no-op elsewhere).

    Capture loops allocate and free large buffers chunk after chunk (XLA:CPU buffers, numpy
    copies) from several threads; glibc keeps what they free in its arenas, so a long loop's
    resident size creeps up by hundreds of MiB though nothing is live (measured in
    docs/benchmarks.md, "Trainer memory"). Trimming after each chunk keeps the peak flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
