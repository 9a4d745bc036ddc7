"""Process-wide JAX settings shared by the CLI, tests and benchmarks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kvstore.process import release_free_memory, silence_xla_logs  # noqa: F401 (shared with the store)

DEFAULT_CACHE_DIR = ".jax_cache"


def enable_compilation_cache(path: str | Path | None = None) -> Path:
    """Turns on JAX's persistent compilation cache in a project-local folder.

    The folder is ``path``, else ``$VINEKV_JAX_CACHE``, else ``./.jax_cache``. Every compiled
    program is kept, so a second run of the same shapes skips compilation.
    """
    import jax

    folder = Path(path or os.environ.get("VINEKV_JAX_CACHE") or DEFAULT_CACHE_DIR).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def quiet_logs() -> None:
    """Silences EasyDeL/absl chatter below WARNING so progress output stays readable."""
    for name in ("easydel", "eformer", "ejkernel", "absl", "jax._src.xla_bridge"):
        logging.getLogger(name).setLevel(logging.WARNING)
