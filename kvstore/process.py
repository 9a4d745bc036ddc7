"""Process-level helpers the store needs and the rest of vinekv shares (`vinekv.runtime`
re-exports them): quiet XLA and library logs, JAX's persistent compilation cache, and
returning freed C-heap memory to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from pathlib import Path


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


def default_cache_dir() -> Path:
    """EasyDeL's own persistent compilation cache (ejkernel's): ``$COMPILE_FUNC_DIR``, else
    ``~/.cache/ejkernel-cache/ejit_compiled_functions`` (``~/Library/Caches/...`` on macOS): one
    cache per machine, shared by every clone, vinekv's programs and EasyDeL's kernels."""
    if os.environ.get("COMPILE_FUNC_DIR"):
        return Path(os.environ["COMPILE_FUNC_DIR"])
    caches = Path.home() / ("Library/Caches" if sys.platform == "darwin" else ".cache")
    return caches / "ejkernel-cache" / "ejit_compiled_functions"


def enable_compilation_cache(path: str | Path | None = None) -> Path:
    """Turns on JAX's persistent compilation cache: ``path``, else ``$VINEKV_JAX_CACHE``, else
    `default_cache_dir`. Every compiled program is kept, so a second run of the same shapes
    skips compilation. EasyDeL's kernels (ejkernel's ``@ejit``) point JAX's cache at
    ``$COMPILE_FUNC_DIR`` whenever one is defined, so that is set to the same folder (else a
    folder given here was silently replaced by EasyDeL's on its import)."""
    import jax

    folder = Path(path or os.environ.get("VINEKV_JAX_CACHE") or default_cache_dir()).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["COMPILE_FUNC_DIR"] = str(folder)  # read when ejkernel is imported
    ejit = sys.modules.get("ejkernel.callib._ejit")
    if ejit is not None:  # already imported: its later @ejit definitions read the module's value
        ejit.COMPILE_FUNC_DIR = str(folder)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def quiet_logs() -> None:
    """Silences EasyDeL/absl chatter below WARNING so progress output stays readable."""
    for name in ("easydel", "eformer", "ejkernel", "absl", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
