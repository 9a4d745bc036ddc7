"""Policy fingerprint: a cheap, stable identity of a model's architecture and weights.

``fingerprint = blake2b(arch_config, [(path, shape, dtype, sample(leaf)) for leaf in params])``
where ``sample(leaf)`` gathers ``SAMPLES_PER_LEAF`` elements at fixed, path-seeded flat
indices. Cost is O(number of leaves), not O(number of weights): no pass over a 7B model's
weights. Equal weights give equal fingerprints in any process; an optimizer step, which moves
essentially every weight, changes it. A change confined to elements outside the samples (say
one embedding row) is not seen: the fingerprint guards against stale snapshots, it is not a
checksum.

The fingerprint of a model is cached against the identity of its parameter arrays (held by
weak reference): a later call on the same model object costs a pass over its parameter
`Variable`s (~1 ms for Qwen2-0.5B's 291, against ~50 ms to recompute), and any update that
replaces a parameter's value (an optimizer step, `nnx.update`, `Variable.set_value`) recomputes
it. Replacing a `Variable` object itself (``module.kernel = nnx.Param(...)``) or a submodule is
not seen by the cache: call `policy_fingerprint(model, cached=False)` after that. An entry is
dropped with its model, so the cache keeps no model's parameters alive.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import weakref
import zlib
from typing import Any

import jax
import numpy as np
from flax import nnx

SAMPLES_PER_LEAF = 64


# Config fields that define what the network computes. Runtime fields (attention kernel,
# sharding, kv dtype, block sizes) are left out: they change how, not what.
ARCH_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "attention_bias",
    "mlp_bias",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
)


def arch_config(model: Any) -> dict[str, Any]:
    """The architecture-defining subset of ``model.config`` as JSON-able values."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    fields = config.to_dict()
    return {name: fields[name] for name in ARCH_FIELDS if name in fields}


def _sample_indices(path: str, size: int) -> np.ndarray:
    """Fixed flat indices into a leaf of ``size`` elements, seeded by its path (process-stable)."""
    count = min(SAMPLES_PER_LEAF, size)
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    return np.sort(rng.choice(size, size=count, replace=False)) if size > count else np.arange(size)


_GATHERS: dict[tuple, Any] = {}


def _gather_samples(values: list[Any], layout: tuple[tuple[str, tuple[int, ...], str], ...]) -> list[np.ndarray]:
    """The fixed samples of every leaf, gathered by one jitted program per parameter layout."""
    if layout not in _GATHERS:
        coords = [
            np.unravel_index(_sample_indices(path, int(np.prod(shape))), shape) if shape else ()
            for path, shape, _ in layout
        ]
        _GATHERS[layout] = jax.jit(lambda vals: [v[c] for v, c in zip(vals, coords, strict=True)])
    return jax.device_get(_GATHERS[layout](values))


# id(model) -> (weak ref to the model, its parameter Variables, weak refs to their arrays, fingerprint);
# an entry is dropped when its model is collected.
# Keyed by id: EasyDeL modules hash by hashing their whole state.
_CACHE: dict[int, tuple[Any, list[Any], list[Any], str]] = {}


def policy_fingerprint(model: Any, cached: bool = True) -> str:
    """Returns a 32-hex-digit fingerprint of ``model``'s architecture config and parameters.

    With ``cached``, a previous result for this model object is reused while every parameter
    `Variable` still holds the very array it held then.
    """
    entry = _CACHE.get(id(model)) if cached else None
    if entry is not None:
        model_ref, variables, refs, fingerprint = entry
        if model_ref() is model and all(ref() is var.raw_value for var, ref in zip(variables, refs, strict=True)):
            return fingerprint
    params = nnx.state(model, nnx.Param)
    fingerprint = _fingerprint(model, params)
    variables = [leaf for leaf in jax.tree_util.tree_leaves(params, is_leaf=_is_variable) if _is_variable(leaf)]
    with contextlib.suppress(TypeError):  # something not weakly referenceable: not cached
        refs = [weakref.ref(v.raw_value) for v in variables]
        if id(model) not in _CACHE:  # the entry (it holds the Variables) goes with the model
            weakref.finalize(model, _CACHE.pop, id(model), None)
        _CACHE[id(model)] = (weakref.ref(model), variables, refs, fingerprint)
    return fingerprint


def _is_variable(leaf: Any) -> bool:
    return isinstance(leaf, nnx.Variable)


def _fingerprint(model: Any, params: Any) -> str:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    values = [leaf.value if hasattr(leaf, "value") else leaf for _, leaf in leaves]
    layout = tuple(
        (jax.tree_util.keystr(path), tuple(v.shape), str(v.dtype)) for (path, _), v in zip(leaves, values, strict=True)
    )
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps(arch_config(model), sort_keys=True, default=str).encode())
    for (path, shape, dtype), sample in zip(layout, _gather_samples(values, layout), strict=True):
        digest.update(f"{path}|{shape}|{dtype}|".encode())
        digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.hexdigest()
