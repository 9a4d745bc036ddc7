"""int4 codec (KIVI style): its documented error bound and parameter rules, host/device bit
identity, prefix locality through a real store, zarr-python + the documented numpy decoder,
chunking refusal, and next-token KL / size on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _store_worker import PROMPT_LEN as SYN_PLEN
from _store_worker import synthetic_state
from codec_kit import bits, doc_snippet, node_wise_decode, plain, read_in_plain_python

from vinekv.kvstore import SnapshotStore, capture_state, get_codec, resume_from_state
from vinekv.kvstore.codecs import CODECS, Int4Codec

REPO = Path(__file__).resolve().parent.parent
G = 16  # key group of the store tests
PLEN, T = 21, 50  # prompt 21 and response 29 tokens: neither a multiple of G
INT4 = {"name": "int4", "group_size": G}


# -- helpers --------------------------------------------------------------------------------------


def _assert_bits_equal(a: np.ndarray, b: np.ndarray, what: str = "") -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    assert np.array_equal(bits(a), bits(b)), f"{what}: {np.count_nonzero((bits(a) != bits(b)).any(-1))} differ"


def _prefix(arrays: dict[str, np.ndarray], t: int, g: int) -> dict[str, np.ndarray]:
    return {
        "q": arrays["q"][:, :, :t],
        "key_params": arrays["key_params"][:, :, : -(-t // g)],
        "value_params": arrays["value_params"][:, :, :t],
    }


def _element_params(arrays: dict[str, np.ndarray], g: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) float32 of every element, ``[layers, 2, t, heads, head_dim]``."""
    t = arrays["q"].shape[2]
    kp = np.repeat(arrays["key_params"].astype(np.float32), g, axis=2)[:, :, :t]
    vp = np.broadcast_to(arrays["value_params"].astype(np.float32)[..., None], kp.shape)
    return np.stack([kp[:, 0], vp[:, 0]], axis=1), np.stack([kp[:, 1], vp[:, 1]], axis=1)


def _group_min_max(x: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """Per element, min and max of its quantisation group (``x``: ``[layers, 2, t, heads, dim]``)."""
    t = x.shape[2]
    starts = np.arange(0, t, g)
    kmin = np.repeat(np.minimum.reduceat(x[:, 0], starts, axis=1), g, axis=1)[:, :t]
    kmax = np.repeat(np.maximum.reduceat(x[:, 0], starts, axis=1), g, axis=1)[:, :t]
    vmin = np.broadcast_to(x[:, 1].min(-1, keepdims=True), kmin.shape)
    vmax = np.broadcast_to(x[:, 1].max(-1, keepdims=True), kmax.shape)
    return np.stack([kmin, vmin], axis=1), np.stack([kmax, vmax], axis=1)


def check_documented_bounds(x: np.ndarray, arrays: dict[str, np.ndarray], decoded: np.ndarray, g: int) -> float:
    """Asserts the module docstring's rules on float32 ``x`` and returns the max element error:
    zero = largest float16 <= group min, scale = smallest float16 with 15 * scale >= max - zero,
    |x - x'| <= scale * (1/2 + 2^-18) + 2^-23 |x|."""
    scale, zero = _element_params(arrays, g)
    lo, hi = _group_min_max(x, g)
    zero16, scale16 = zero.astype(np.float16), scale.astype(np.float16)
    assert (zero <= lo).all() and (np.nextafter(zero16, np.float16(np.inf)).astype(np.float32) > lo).all()
    r = hi - zero
    assert (np.float32(15) * scale >= r).all()
    assert (np.float32(15) * np.nextafter(scale16, np.float16(-np.inf)).astype(np.float32) < r).all()
    err = np.abs(decoded.astype(np.float32) - x)
    assert (err <= scale * np.float32(0.5 + 2**-18) + np.abs(x) * np.float32(2**-23)).all()
    return float(err.max())


def outlier_kv(dtype, tokens: int = 75, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random K/V ``[2, tokens, 2, 16]`` with KIVI-like outlier key channels (large offset and
    spread, one with a large offset and tiny spread), and constant groups of float16 values."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((2, tokens, 2, 16), dtype=np.float32)
    values = rng.standard_normal((2, tokens, 2, 16), dtype=np.float32)
    keys[..., 3] = keys[..., 3] * 40 + 25
    keys[..., 11] = keys[..., 11] * 8 - 60
    keys[..., 7] = keys[..., 7] * 0.01 + 300.3  # offset >> spread: float16 rounding of zero matters here
    values[:, :, 1, 4] *= 30  # a value outlier (per token quantisation absorbs it in its own token)
    keys[:, 0:16, 0, 5] = 1.5  # constant key groups (G = 16): decode exactly
    keys[:, 16:32, 1, :] = 0.0
    values[:, 7, 1, :] = -3.25  # constant value vectors
    values[:, 9] = 0.0
    return keys.astype(dtype), values.astype(dtype)


def _kv(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    return np.stack([keys, values], axis=1).astype(np.float32)


# -- the codec on its own -------------------------------------------------------------------------


def test_registered_and_spec_round_trips():
    assert CODECS["int4"] is Int4Codec
    codec = get_codec(INT4)
    assert isinstance(codec, Int4Codec) and codec.group_size == G and codec.zstd_level == 1
    spec = codec.spec()
    assert spec["name"] == "int4" and spec["group_size"] == G and "key_params" in spec["decode"]
    assert get_codec(json.loads(json.dumps(spec))) == codec  # from the JSON spec stored in the node
    assert get_codec("int4").group_size == 32
    assert codec.token_groups() == {"q": 1, "key_params": G, "value_params": 1}
    assert set(codec.array_names) == set(codec.token_groups())


@pytest.mark.parametrize("bad", [0, -4, 2.0, True, "16", None])
def test_bad_group_size_is_refused(bad):
    with pytest.raises(ValueError, match="group_size"):
        Int4Codec(group_size=bad)


def test_odd_head_dim_is_refused():
    codec = Int4Codec(8)
    keys = np.zeros((1, 4, 1, 15), np.float32)
    with pytest.raises(ValueError, match="head_dim.*15"):
        codec.encode(keys, keys)
    with pytest.raises(ValueError, match="head_dim.*15"):
        codec.device_encode(jnp.asarray(keys), jnp.asarray(keys), 4)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_error_bound_and_exact_groups_on_outlier_data(dtype):
    codec = Int4Codec(G)
    keys, values = outlier_kv(dtype)
    stored = codec.encode(keys, values)
    layers, tokens, heads, head_dim = keys.shape
    assert stored["q"].data.shape == (layers, 2, tokens, heads, head_dim // 2) and stored["q"].data.dtype == np.uint8
    assert stored["key_params"].data.shape == (layers, 2, -(-tokens // G), heads, head_dim)
    assert stored["value_params"].data.shape == (layers, 2, tokens, heads)
    assert {n: (s.dims, s.token_group) for n, s in stored.items()} == {
        n: (codec.dims(n), g) for n, g in codec.token_groups().items()
    }
    arrays = plain(stored)
    x = _kv(keys, values)
    decoded = codec.decode(arrays, str(np.dtype(dtype)), np.float32)
    assert decoded.dtype == np.float32 and decoded.shape == x.shape
    check_documented_bounds(x, arrays, decoded, G)
    for where in [(slice(None), 0, slice(0, 16), 0, 5), (slice(None), 0, slice(16, 32), 1), (slice(None), 1, 7, 1)]:
        np.testing.assert_array_equal(decoded[where], x[where])
    np.testing.assert_array_equal(decoded[:, 1, 9], 0)
    # Codes use the whole 0..15 range and the outlier channels do not spoil the ordinary ones:
    # per-channel key groups keep a normal channel's error at its own spread / 30. Channel 7
    # (300.3 +- 0.03): zero rounded down by < one float16 ulp (0.25) costs < 0.25 / 30, where
    # zero rounded to nearest would cost up to 0.125.
    codes = np.stack([arrays["q"] & 15, arrays["q"] >> 4], -1)
    assert codes.min() == 0 and codes.max() == 15
    err = np.abs(decoded - x)
    assert err[:, 0, :, :, 0].max() < 8 / 30 and err[:, 0, :, :, 7].max() < 0.02
    # Output in another dtype is the float32 decode cast once.
    _assert_bits_equal(codec.decode(arrays, "float32", ml_dtypes.bfloat16), decoded.astype(ml_dtypes.bfloat16))


def test_prefix_decode_is_the_full_decode_cut():
    codec = Int4Codec(G)
    keys, values = outlier_kv(np.float32, tokens=53)
    arrays = plain(codec.encode(keys, values))
    full = codec.decode(arrays, "float32", np.float32)
    for t in range(1, 54):
        _assert_bits_equal(codec.decode(_prefix(arrays, t, G), "float32", np.float32), full[:, :, :t], f"t={t}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("width", "length", "group"), [(48, 37, 16), (40, 40, 8), (40, 1, 16), (37, 23, 5)])
def test_device_matches_host_bit_for_bit(dtype, width, length, group):
    codec = Int4Codec(group)
    keys, values = outlier_kv(np.float32, tokens=width, seed=width + length)
    keys[:, length:] = 1e30  # padding garbage must not reach any parameter of a real token
    keys[:, length + 1 :: 3, 0] = -3e38
    keys[:, length + 2 :: 4, 1] = np.nan
    values[:, length:] = -1e30
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    keys, values = keys.astype(np_dtype), values.astype(np_dtype)
    host = codec.encode(keys[:, :length], values[:, :length])
    out = codec.device_encode(jnp.asarray(keys), jnp.asarray(values), length)
    assert out["q"].shape[2] == width and out["key_params"].shape[2] == -(-width // group)
    device = codec.trim(jax.device_get(out), length)
    assert set(device) == set(host)
    for name in host:
        assert (device[name].dims, device[name].token_group) == (host[name].dims, host[name].token_group)
        _assert_bits_equal(device[name].data, host[name].data, f"encode {name}")
    arrays = plain(host)
    check_documented_bounds(
        _kv(keys[:, :length], values[:, :length]), arrays, codec.decode(arrays, dtype, "float32"), group
    )
    for out_dtype in ("float32", "bfloat16"):
        on_host = codec.decode(arrays, dtype, out_dtype)
        on_device = jax.device_get(
            codec.device_decode({k: jnp.asarray(a) for k, a in arrays.items()}, dtype, out_dtype)
        )
        _assert_bits_equal(np.asarray(on_device), on_host, f"decode to {out_dtype}")


def test_device_encode_length_is_traced_not_compiled_in():
    """One program per width: another length reuses it and still matches the host."""
    codec = Int4Codec(G)
    keys, values = outlier_kv(np.float32, tokens=40, seed=3)
    for length in (9, 33):
        device = codec.trim(
            jax.device_get(codec.device_encode(jnp.asarray(keys), jnp.asarray(values), jnp.int32(length))), length
        )
        host = codec.encode(keys[:, :length], values[:, :length])
        for name in host:
            _assert_bits_equal(device[name].data, host[name].data, f"length {length} {name}")


# -- through a store, on the tiny model -----------------------------------------------------------


@pytest.fixture(scope="module")
def trajectory(tiny_model):
    """A 50-token trajectory of the tiny model (ids has one more token to resume with)."""
    ids = np.random.default_rng(11).integers(0, 256, size=(1, T + 1)).astype(np.int32)
    return ids, capture_state(tiny_model, ids[:, :T], T)


@pytest.fixture(scope="module")
def int4_store(trajectory, tmp_path_factory):
    _, state = trajectory
    path = tmp_path_factory.mktemp("int4") / "s"
    with SnapshotStore.open(path, codec=INT4, chunk_tokens=32) as store:
        store.spill("r0", "t0", state, PLEN, reward=1.0)
        store.flush()
        yield path, store


def test_real_kv_round_trip_within_bound(trajectory):
    _, state = trajectory
    codec = Int4Codec(G)
    keys, values = state.keys[:, 0], state.values[:, 0]
    arrays = plain(codec.encode(keys, values))
    max_err = check_documented_bounds(_kv(keys, values), arrays, codec.decode(arrays, "float32", np.float32), G)
    print(f"tiny model int4 max element error {max_err:.4g} (|kv| max {np.abs(_kv(keys, values)).max():.3g})")


def test_prefix_reads_equal_the_full_read(trajectory, int4_store):
    _, state = trajectory
    _, store = int4_store
    codec = Int4Codec(G)
    full = store.read_prefix("r0", "t0", T)
    # What the store holds is the host encode of each node, decoded.
    expected = node_wise_decode(codec, state, PLEN)
    _assert_bits_equal(full.keys[:, 0], expected[:, 0])
    _assert_bits_equal(full.values[:, 0], expected[:, 1])
    # Inside the prompt, a group boundary, the prompt's end, inside the response's first and
    # (partial) last groups, one short of the end.
    for t in (7, 16, PLEN, PLEN + 5, PLEN + G + 3, T - 1):
        got = store.read_prefix("r0", "t0", t)
        _assert_bits_equal(got.keys, full.keys[:, :, :t], f"keys t={t}")
        _assert_bits_equal(got.values, full.values[:, :, :t], f"values t={t}")
    on_device = store.read_prefixes([("r0", "t0", PLEN + 5), ("r0", "t0", T)], on_device=True)
    for state_d in on_device:
        t = state_d.position
        _assert_bits_equal(np.asarray(state_d.keys), full.keys[:, :, :t], f"device keys t={t}")
        _assert_bits_equal(np.asarray(state_d.values), full.values[:, :, :t], f"device values t={t}")


ZARR_READER = r"""
import sys
import numpy as np, zarr
g = zarr.open_group(sys.argv[1], mode="r")
node = g["runs/r0/trajectories/t0"]
info = node.attrs["vinekv"]
prompt = g[f"runs/r0/prompts/{info['prompt']}"]
G = info["codec"]["group_size"]
def first(part, n):  # a node's first n tokens, by the formula in docs/store-format.md
    return int4_decode(part["q"][:, :, :n], part["key_params"][:, :, : -(-n // G)], part["value_params"][:, :, :n], G)
out = {}
for t in (int(a) for a in sys.argv[3:]):
    p, n = min(t, info["prompt_len"]), t - info["prompt_len"]
    out[str(t)] = np.concatenate([first(prompt, p)] + ([first(node, n)] if n > 0 else []), axis=2)
np.savez(sys.argv[2], **out)
"""


def test_zarr_python_and_the_documented_formula_read_it(int4_store, tmp_path):
    path, store = int4_store
    ts = (5, PLEN, PLEN + G + 3, T)
    theirs = read_in_plain_python(doc_snippet("int4_decode") + ZARR_READER, path, tmp_path, ts)
    for t in ts:
        ours = store.read_prefix("r0", "t0", t)
        _assert_bits_equal(theirs[t][:, 0], ours.keys[:, 0], f"keys t={t}")
        _assert_bits_equal(theirs[t][:, 1], ours.values[:, 0], f"values t={t}")
    meta = json.loads((path / "runs/r0/trajectories/t0/key_params/zarr.json").read_text())
    assert meta["data_type"] == "float16" and meta["dimension_names"][2] == "token_group"
    assert meta["attributes"]["vinekv"]["token_group"] == G
    inner = meta["codecs"][0]["configuration"]["chunk_shape"]
    assert inner[2] == 32 // G  # key_params chunks cover the same 32 tokens as the other arrays'


def test_chunk_tokens_not_a_multiple_of_group_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"chunk_tokens 24 .*token group 16"):
        SnapshotStore.open(tmp_path / "s", codec=INT4, chunk_tokens=24)


def test_next_token_kl_and_size(tiny_model, trajectory, int4_store):
    """Resuming from int4 KV vs the exact KV: next-token KL on the tiny model (measured at most
    9.1e-6 nats over these t; bound 1e-4) and the stored bytes."""
    ids, state = trajectory
    _, store = int4_store
    kls = []
    for t in (PLEN, PLEN + G + 3, T):
        ref, _ = resume_from_state(tiny_model, state.prefix(t), ids[:, t : t + 1])
        lossy, _ = resume_from_state(tiny_model, store.read_prefix("r0", "t0", t, model=tiny_model), ids[:, t : t + 1])
        p, q = jax.nn.log_softmax(ref[0, -1]), jax.nn.log_softmax(lossy[0, -1])
        kls.append(float((np.exp(p) * (p - q)).sum()))
    print(f"tiny model next-token KL, int4 vs exact: {kls}")
    assert max(kls) < 1e-4
    size = store.size("r0")
    assert size.raw == T * 2 * 2 * 2 * 16 * 4  # 50 tokens, 2 layers x k/v x 2 heads x 16 dims, float32
    assert 0 < size.stored < size.raw
    print(f"tiny model: raw {size.raw} B, int4 stored {size.stored} B (metadata dominates at 50 tokens)")


def test_size_vs_raw_and_int8_on_a_long_trajectory(tmp_path):
    """600 tokens of 4 layers x 2 heads x 64 dims (float32): int4 codes are 1/8 of the raw bytes
    plus float16 params (values 4 B per token and head, keys 4 B per 32 tokens and channel):
    measured ratio 6.8 vs int8's 4.0."""
    state = synthetic_state(0, length=600)
    sizes = {}
    for codec in ("int8", "int4"):
        with SnapshotStore.open(tmp_path / codec, codec=codec) as store:
            store.spill("r", "t", state, SYN_PLEN)
            store.flush()
            sizes[codec] = store.size("r")
    print({k: (v.raw, v.stored, round(v.ratio, 2)) for k, v in sizes.items()})
    assert sizes["int4"].raw == 600 * 2 * 4 * 2 * 64 * 4
    assert sizes["int4"].ratio > 6
    assert sizes["int4"].stored < 0.7 * sizes["int8"].stored
