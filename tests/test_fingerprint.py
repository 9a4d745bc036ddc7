"""The policy fingerprint is stable across processes and changes after an optimizer step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vinekv.kvstore import policy_fingerprint
from vinekv.models import build_model

REPO = Path(__file__).resolve().parent.parent


def test_fingerprint_stable_across_processes(tiny_model):
    code = (
        "import jax.numpy as jnp\n"
        "from vinekv.models import build_model\n"
        "from vinekv.kvstore import policy_fingerprint\n"
        "print(policy_fingerprint(build_model('llama', kv_dtype=jnp.float32, seed=0)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    other_process = out.stdout.strip().splitlines()[-1]
    assert other_process == policy_fingerprint(tiny_model)
    assert len(other_process) == 32


def test_fingerprint_depends_on_weights_not_runtime_settings(tiny_model):
    assert policy_fingerprint(build_model("llama", kv_dtype=jnp.bfloat16, seed=0)) == policy_fingerprint(tiny_model)
    assert policy_fingerprint(build_model("llama", seed=1)) != policy_fingerprint(tiny_model)


def test_fingerprint_changes_after_optimizer_step():
    model = build_model("llama", seed=0)
    before = policy_fingerprint(model)
    ids = jnp.arange(16, dtype=jnp.int32)[None] % 256
    graphdef, params, others = model.split_module()

    def loss(p):
        logits = nnx.merge(graphdef, p, others)(input_ids=ids[:, :-1]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    with model.mesh:
        grads = jax.grad(loss)(params)
    optimizer = optax.adam(1e-3)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    nnx.update(model, optax.apply_updates(params, updates))
    assert policy_fingerprint(model) != before


def test_cached_fingerprint_follows_every_parameter_update():
    """The cache (per model object, against its parameter arrays) never serves a stale value."""
    model = build_model("llama", seed=0)
    first = policy_fingerprint(model)
    assert policy_fingerprint(model) == first == policy_fingerprint(model, cached=False)
    params = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)]
    last = params[-1]  # replace one leaf only: every other array stays the same object
    last.set_value(last.get_value() + 1)
    changed = policy_fingerprint(model)
    assert changed != first and changed == policy_fingerprint(model, cached=False)
    last.set_value(last.get_value() - 1)  # a new array with the old contents: same fingerprint again
    assert policy_fingerprint(model) == first
    assert policy_fingerprint(build_model("llama", seed=0)) == first  # another object, same weights
