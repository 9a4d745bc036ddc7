"""int4-hadamard codec: the Hadamard matrix, a hand-computed encode/decode, the documented error
bound on outlier data, exactness of the decode (a plain matrix product gives the same bits),
prefix locality through a real store, zarr-python + the documented numpy decoder, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _store_worker import PROMPT_LEN as SYN_PLEN
from _store_worker import synthetic_state
from codec_kit import bits, doc_snippet, node_wise_decode, plain, read_in_plain_python

from vinekv.kvstore import SnapshotStore, capture_state, get_codec
from vinekv.kvstore.codecs import CODECS, Int4HadamardCodec
from vinekv.kvstore.codecs.int4_hadamard import hadamard

REPO = Path(__file__).resolve().parent.parent
PLEN, T = 21, 50
CODEC = {"name": "int4-hadamard"}


def test_registered_and_spec_round_trips():
    assert CODECS["int4-hadamard"] is Int4HadamardCodec
    codec = get_codec(CODEC)
    spec = codec.spec()
    assert spec["name"] == "int4-hadamard" and spec["zstd_level"] == 1 and "Hadamard" in spec["decode"]
    assert get_codec(json.loads(json.dumps(spec))) == codec
    assert codec.token_groups() == {"q": 1, "scale": 1}


@pytest.mark.parametrize("head_dim", [1, 12, 24, 48])
def test_head_dim_not_a_power_of_two_is_refused(head_dim):
    codec = get_codec(CODEC)
    keys = np.zeros((1, 4, 1, head_dim), np.float32)
    with pytest.raises(ValueError, match=f"head_dim must be a power of two >= 2, got {head_dim}"):
        codec.encode(keys, keys)
    with pytest.raises(ValueError, match=f"got {head_dim}"):
        codec.device_encode(jnp.asarray(keys), jnp.asarray(keys), 4)


@pytest.mark.parametrize("d", [2, 4, 32, 128])
def test_hadamard_matrix_is_sylvester(d):
    h = hadamard(d)
    np.testing.assert_array_equal(h @ h, d * np.eye(d, dtype=np.int32))
    half = hadamard(d // 2) if d > 2 else np.ones((1, 1), np.int32)
    np.testing.assert_array_equal(h, np.block([[half, half], [half, -half]]))  # H_2n = [[H, H], [H, -H]]


def test_a_hand_computed_vector():
    """head_dim 2 (k = 0): x = (3, 1) -> y = H x = (4, 2); scale = float16(4 / 7.5) = 0.5332;
    y / scale = (7.50, 3.75) -> floor (7, 3) -> codes (15, 11); decode: 2 * code - 15 = (15, 7),
    H @ (15, 7) = (22, 8), times scale times 2^(0 - 1 - 1)."""
    codec = get_codec(CODEC)
    keys = np.array([3.0, 1.0], np.float32).reshape(1, 1, 1, 2)
    values = np.zeros_like(keys)
    arrays = plain(codec.encode(keys, values))
    scale = np.float16(np.float32(4) * np.float32(1 / 7.5))
    assert arrays["scale"][0, 0, 0, 0] == scale and arrays["scale"][0, 1, 0, 0] == 0
    assert arrays["q"][0, 0, 0, 0, 0] == 15 | (11 << 4)
    assert arrays["q"][0, 1, 0, 0, 0] == 8 | (8 << 4)  # a zero vector: scale 0, codes 8
    decoded = codec.decode(arrays, "float32", np.float32)
    expected = np.array([22, 8], np.float32) * np.float32(scale) * np.float32(0.25)
    np.testing.assert_array_equal(decoded[0, 0, 0, 0], expected)  # (2.9326, 1.0664)
    np.testing.assert_array_equal(decoded[0, 1, 0, 0], [0, 0])


def outlier_kv(dtype, tokens: int = 75, head_dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random K/V ``[2, tokens, 2, head_dim]`` with outlier key channels and a value outlier."""
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((2, tokens, 2, head_dim), dtype=np.float32)
    values = rng.standard_normal((2, tokens, 2, head_dim), dtype=np.float32)
    keys[..., 3] = keys[..., 3] * 40 + 25
    keys[..., head_dim - 3] = keys[..., head_dim - 3] * 8 - 60
    values[:, :, 1, 4] *= 30
    values[:, 9] = 0.0
    return keys.astype(dtype), values.astype(dtype)


@pytest.mark.parametrize("head_dim", [8, 32, 64])
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_error_bound_and_exact_decode(dtype, head_dim):
    """Per vector ``||x - x'||_2 <= 2^k * scale / 2`` (the docstring's bound; a float16 and float32
    rounding margin); the decode equals the documented integer matrix product bit for bit."""
    codec = get_codec(CODEC)
    keys, values = outlier_kv(dtype, head_dim=head_dim)
    arrays = plain(codec.encode(keys, values))
    decoded = codec.decode(arrays, np.dtype(dtype).name, np.float32)
    x = np.stack([keys, values], axis=1).astype(np.float32)
    k = (head_dim.bit_length() - 1) // 2
    scale = arrays["scale"].astype(np.float32)
    err = np.linalg.norm(decoded - x, axis=-1)
    bound = 2.0**k * scale / 2 * (1 + 2**-9) + 1e-6 * np.abs(x).max(-1)
    assert (err <= bound).all(), float((err / bound).max())
    assert (decoded[:, 1, 9] == 0).all()  # zero vectors decode exactly
    codes = np.stack([arrays["q"] & 15, arrays["q"] >> 4], -1).reshape(*arrays["q"].shape[:-1], head_dim)
    product = ((2 * codes.astype(np.int64) - 15) @ hadamard(head_dim).T).astype(np.float64)
    reference = product * scale[..., None].astype(np.float64) * 2.0 ** (k - (head_dim.bit_length() - 1) - 1)
    np.testing.assert_array_equal(bits(reference.astype(np.float32)), bits(decoded))  # float64: same bits
    # The rotation is what makes per-token keys work: the same codes without it (plain
    # symmetric 4-bit per token and head) err several times more on the outlier-channel keys.
    unrotated_scale = np.abs(keys.astype(np.float32)).max(-1, keepdims=True) / 7.5
    unrotated = (np.clip(np.floor(keys.astype(np.float32) / unrotated_scale), -8, 7) + 0.5) * unrotated_scale
    rms = np.sqrt(np.mean((decoded[:, 0] - keys.astype(np.float32)) ** 2))
    assert rms < 0.5 * np.sqrt(np.mean((unrotated - keys.astype(np.float32)) ** 2))


# -- through a store, on the tiny model -----------------------------------------------------------


@pytest.fixture(scope="module")
def trajectory(tiny_model):
    ids = np.random.default_rng(11).integers(0, 256, size=(1, T)).astype(np.int32)
    return ids, capture_state(tiny_model, ids, T)


@pytest.fixture(scope="module")
def store(trajectory, tmp_path_factory):
    _, state = trajectory
    path = tmp_path_factory.mktemp("int4h") / "s"
    with SnapshotStore.open(path, codec=CODEC, chunk_tokens=16) as store:
        store.spill("r0", "t0", state, PLEN)
        store.flush()
        yield path, store


def test_prefix_reads_are_the_full_read_cut(trajectory, store):
    _, state = trajectory
    _, s = store
    codec = get_codec(CODEC)
    full = s.read_prefix("r0", "t0", T)
    expected = node_wise_decode(codec, state, PLEN)
    np.testing.assert_array_equal(bits(full.keys[:, 0]), bits(expected[:, 0]))
    np.testing.assert_array_equal(bits(full.values[:, 0]), bits(expected[:, 1]))
    for t in (5, 16, PLEN, PLEN + 1, PLEN + 16, T - 1):
        got = s.read_prefix("r0", "t0", t)
        np.testing.assert_array_equal(bits(got.keys), bits(full.keys[:, :, :t]))
        np.testing.assert_array_equal(bits(got.values), bits(full.values[:, :, :t]))
    (on_device,) = s.read_prefixes([("r0", "t0", PLEN + 3)], on_device=True)
    np.testing.assert_array_equal(bits(np.asarray(on_device.keys)), bits(full.keys[:, :, : PLEN + 3]))


ZARR_READER = r"""
import sys
import numpy as np, zarr
g = zarr.open_group(sys.argv[1], mode="r")
node = g["runs/r0/trajectories/t0"]
info = node.attrs["vinekv"]
assert info["codec"]["name"] == "int4-hadamard"
prompt = g[f"runs/r0/prompts/{info['prompt']}"]
out = {}
for t in (int(a) for a in sys.argv[3:]):
    p, n = min(t, info["prompt_len"]), t - info["prompt_len"]
    parts = [int4_hadamard_decode(prompt["q"][:, :, :p], prompt["scale"][:, :, :p])]
    if n > 0:
        parts.append(int4_hadamard_decode(node["q"][:, :, :n], node["scale"][:, :, :n]))
    out[str(t)] = np.concatenate(parts, axis=2)
np.savez(sys.argv[2], **out)
"""


def test_zarr_python_and_the_documented_decoder_read_it_bit_for_bit(store, tmp_path):
    path, s = store
    ts = (5, PLEN, PLEN + 17, T)
    theirs = read_in_plain_python(doc_snippet("int4_hadamard_decode") + ZARR_READER, path, tmp_path, ts)
    for t in ts:
        ours = s.read_prefix("r0", "t0", t)
        np.testing.assert_array_equal(bits(theirs[t][:, 0]), bits(ours.keys[:, 0]), err_msg=f"keys t={t}")
        np.testing.assert_array_equal(bits(theirs[t][:, 1]), bits(ours.values[:, 0]), err_msg=f"values t={t}")


def test_size_vs_raw_int8_and_int4_on_a_long_trajectory(tmp_path):
    """600 tokens, 4 layers x 2 heads x 64 dims, float32: 4 bits per element plus a float16 scale
    per 64 (4.25 bits: 7.5x smaller than float32 before zstd), below int4's groups of 32."""
    state = synthetic_state(0, length=600)
    sizes = {}
    for codec in ("int8", "int4", "int4-hadamard"):
        with SnapshotStore.open(tmp_path / codec, codec=codec) as s:
            s.spill("r", "t", state, SYN_PLEN)
            s.flush()
            sizes[codec] = s.size("r")
    print({k: (v.raw, v.stored, round(v.ratio, 2)) for k, v in sizes.items()})
    assert sizes["int4-hadamard"].ratio > 6.5
    assert sizes["int4-hadamard"].stored < sizes["int4"].stored < sizes["int8"].stored
