"""Process-wide JAX settings shared by the CLI, tests and benchmarks (they live in
`vinekv.kvstore.process`, the bottom layer, so replay workers can use them too)."""

from vinekv.kvstore.process import (  # noqa: F401 (the names the CLI, tests and benchmarks import from here)
    default_cache_dir,
    enable_compilation_cache,
    quiet_logs,
    release_free_memory,
    silence_xla_logs,
)
