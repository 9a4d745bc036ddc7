"""Session-wide fixtures: tiny random EasyDeL models and the byte-level tokenizer, built once."""

from __future__ import annotations

import gc
from pathlib import Path

from vinekv.runtime import enable_compilation_cache, quiet_logs, silence_xla_logs

silence_xla_logs()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from vinekv.models import build_model, build_tokenizer  # noqa: E402

enable_compilation_cache()  # EasyDeL's cache folder, shared by every clone and CI run
quiet_logs()

_MODELS: dict[tuple[str, str], object] = {}


def get_model(family: str = "llama", kv_dtype: str = "float32"):
    """A tiny random model per (family, kv dtype), built once per test session."""
    key = (family, kv_dtype)
    if key not in _MODELS:
        _MODELS[key] = build_model(family, kv_dtype=getattr(jnp, kv_dtype), seed=0)
    return _MODELS[key]


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every jit cache after each test module. XLA:CPU maps three memory regions per
    compiled kernel for as long as its executable lives; over the whole suite that reached the
    kernel's ``vm.max_map_count`` (65530) and XLA segfaulted loading the next program. Dropped
    programs come back from the persistent compilation cache when a later module needs them."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_model():
    return get_model("llama", "float32")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def token_seq() -> np.ndarray:
    """``[2, 40]`` random byte tokens: a 32-token 'prompt' and 8 tokens beyond it."""
    return np.random.default_rng(7).integers(0, 256, size=(2, 40)).astype(np.int32)


def no_cache_logits(model, ids) -> np.ndarray:
    """Logits ``[batch, T, vocab]`` of one plain forward over ``ids`` (no KV cache)."""
    with model.mesh:
        return np.asarray(model(input_ids=jnp.asarray(ids, dtype=jnp.int32)).logits)
