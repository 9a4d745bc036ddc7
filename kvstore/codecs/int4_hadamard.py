"""int4-hadamard codec: a Hadamard rotation of each head vector, then 16-level 4-bit codes per token.

QuaRot (Ashkboos et al., 2024) rotates K/V by an orthogonal Hadamard matrix before quantising:
the rotation spreads an outlier channel's energy over every channel, so one scale per
(token, head) serves keys and values alike, and no parameter spans several tokens (every
prefix of a node is its first ``t`` tokens' entries, whatever the node's length).

With ``H`` the Sylvester Hadamard matrix of order ``head_dim`` (``H[i, j] = (-1)^popcount(i & j)``,
entries +-1, ``H @ H = head_dim * I``; head_dim a power of two) and ``k`` such that ``2^k`` is
the largest power of two <= ``sqrt(head_dim)``, each head vector ``x`` (float32) is encoded as

    y     = (H @ x) * 2^-k                      (a butterfly, float32; `_butterfly` fixes its order)
    scale = float16(max_d |y[d]| * float32(1/7.5))
    code  = clip(floor(y / scale), -8, 7) + 8   (0..15; scale 0: every y is 0, codes 8)

that is, 16 levels ``(code - 7.5) * scale`` spanning ``[-7.5, 7.5] * scale`` with no level at
zero (a mid-rise quantiser: all 16 codes in use, where a symmetric one with a zero level has
15; on the task model's KV it halved the next-token KL at equal size). Decoded as

    x'    = float32(H @ (2 * code - 15)) * float32(scale) * 2^(k - log2(head_dim) - 1)

``H @ (2 * code - 15)`` is an integer of magnitude <= 15 * head_dim, and its product with a
float16 scale fits float32's 24-bit significand, so the decode has no rounding at all: any
reader (a matrix product in any order, in float32 or float64) gets the same bits; vinekv's
decode is such a product (BLAS on the host, XLA on the device). The encode's butterfly rounds;
host and device run the same additions in the same order and agree bit for bit.

Error: ``|y - y'| <= scale / 2`` per rotated element (plus float16 rounding of the scale), and
since ``H / sqrt(head_dim)`` is orthogonal, ``||x - x'||_2 = 2^k / sqrt(head_dim) * ||y - y'||_2``,
so every element has ``|x - x'| <= ||x - x'||_2 <= 2^k * scale / 2``. Elements must keep
``max |y| / 7.5`` within float16's range (``|x| <= 65504 * 7.5 / 2^(log2(head_dim) - k)``, about
61000 for head_dim 32).

Layout (token axis 2; ``c`` = 0 keys, 1 values):

- ``q``     uint8   ``[layers, 2, tokens, kv_heads, head_dim // 2]``: the codes (0..15) of
  rotated dims ``2i`` (low nibble) and ``2i + 1`` (high nibble) in byte ``i``.
- ``scale`` float16 ``[layers, 2, tokens, kv_heads]``.

4.5 bits per element at head_dim 32 (4.25 at 64), against 16 for bfloat16.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from vinekv.kvstore.codecs.base import KV_DIMS, KVCodec, StoredArray, check_zstd_level

LEVELS = 16
INV_HALF_RANGE = np.float32(1 / 7.5)  # scale = max |y| / 7.5: the levels span [-7.5, 7.5] * scale

Q_DIMS = ("layer", "kv", "token", "kv_head", "head_dim_pair")

DECODE = (
    "kv[l, c, t, h, :] = float32(H @ (2 * code - 15)) * float32(scale[l, c, t, h]) * 2^(k - log2(head_dim) - 1); "
    "c = 0 keys, 1 values; code[d] = (q[l, c, t, h, d // 2] >> (4 * (d % 2))) & 15 (q uint8, dim 2i in the low "
    "nibble, 2i + 1 in the high one); H = the Sylvester Hadamard matrix of order head_dim, "
    "H[i, j] = (-1)^popcount(i & j); 2^k = the largest power of two <= sqrt(head_dim); scale float16; "
    "the decode is exact in float32"
)


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(
            f"int4-hadamard rotates head vectors by a Hadamard matrix: head_dim must be a power of two >= 2, "
            f"got {head_dim}"
        )


def _shifts(head_dim: int) -> tuple[np.float32, np.float32]:
    """(2^-k, 2^(k - log2 head_dim - 1)): the encode's and the decode's power-of-two factors."""
    log2 = head_dim.bit_length() - 1
    k = log2 // 2
    return np.float32(2.0**-k), np.float32(2.0 ** (k - log2 - 1))


def hadamard(head_dim: int) -> np.ndarray:
    """``[head_dim, head_dim]`` int32 Sylvester Hadamard matrix, ``H[i, j] = (-1)^popcount(i & j)``."""
    _check_head_dim(head_dim)
    i = np.arange(head_dim)
    bits = np.bitwise_and.outer(i, i)
    parity = np.zeros_like(bits)
    while bits.any():
        parity ^= bits & 1
        bits >>= 1
    return (1 - 2 * parity).astype(np.int32)


def _canonical(xp: Any, x: Any) -> Any:
    """float32 ``x`` with subnormals made +0 (XLA:CPU flushes them; numpy does not)."""
    return xp.where(xp.abs(x) < xp.float32(np.finfo(np.float32).tiny), xp.float32(0), x)


def _butterfly(xp: Any, x: Any) -> Any:
    """``H @ x`` along the last axis (``x[..., j]`` -> ``sum_j H[i, j] x[..., j]``) by the fast
    Walsh-Hadamard transform: stage ``s`` pairs dims ``i`` and ``i + 2^s`` within blocks of
    ``2^(s+1)`` into ``(a + b, a - b)``. The fixed order makes the encode's float32 rounding the
    same on numpy and XLA (subnormal intermediates are flushed on both)."""
    head_dim = x.shape[-1]
    lead = x.shape[:-1]
    half = 1
    while half < head_dim:
        blocks = x.reshape(*lead, head_dim // (2 * half), 2, half)
        a, b = blocks[..., 0, :], blocks[..., 1, :]
        x = _canonical(xp, xp.stack([a + b, a - b], axis=-2)).reshape(*lead, head_dim)
        half *= 2
    return x


def _encode(xp: Any, x: Any) -> tuple[Any, Any]:
    """(packed uint8 codes ``[..., head_dim // 2]``, float16 scales ``[...]``) of float32 ``x``."""
    down, _ = _shifts(x.shape[-1])
    y = _butterfly(xp, _canonical(xp, x)) * down
    scale = (xp.abs(y).max(axis=-1) * INV_HALF_RANGE).astype(xp.float16)
    scale = xp.where(xp.isnan(scale), xp.float16(np.nan), scale)  # one canonical NaN (NaN in the vector)
    safe = xp.where(scale > 0, scale, xp.float16(1)).astype(xp.float32)[..., None]
    level = xp.clip(xp.floor(y / safe), -LEVELS // 2, LEVELS // 2 - 1)
    codes = (xp.where(xp.isnan(level), 0, level) + LEVELS // 2).astype(xp.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scale


def _decode(xp: Any, packed: Any, scale: Any) -> Any:
    """float32 ``[..., head_dim]`` of packed codes ``[..., head_dim // 2]`` and float16 scales ``[...]``.

    ``H @ (2 * code - 15)`` as one float32 matrix product: every operand and partial sum is an
    integer below 2^24, so any summation order (BLAS, XLA, a GPU's TF32 or a TPU's bfloat16
    passes: +-1 and odd integers <= 15 are exact in both) gives the same, exact result.
    """
    codes = xp.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    head_dim = codes.shape[-1]
    _, up = _shifts(head_dim)
    levels = codes.astype(xp.float32) * 2 - xp.float32(LEVELS - 1)
    # H is symmetric: H @ v = v @ H; one 2-D product (numpy loops over leading axes otherwise)
    rotated = xp.matmul(levels.reshape(-1, head_dim), xp.asarray(_hadamard_f32(head_dim))).reshape(levels.shape)
    return rotated * scale.astype(xp.float32)[..., None] * up


@functools.lru_cache(maxsize=8)
def _hadamard_f32(head_dim: int) -> np.ndarray:
    return hadamard(head_dim).astype(np.float32)


class Int4HadamardCodec(KVCodec):
    name = "int4-hadamard"
    array_names = ("q", "scale")

    def __init__(self, zstd_level: int = 1):
        self.zstd_level = check_zstd_level(zstd_level)

    def dims(self, name: str) -> tuple[str, ...]:
        return Q_DIMS if name == "q" else KV_DIMS[:-1]

    def encode(self, keys: np.ndarray, values: np.ndarray) -> dict[str, StoredArray]:
        layers, tokens, heads, head_dim = keys.shape
        _check_head_dim(head_dim)
        q = np.empty((layers, 2, tokens, heads, head_dim // 2), np.uint8)
        scale = np.empty((layers, 2, tokens, heads), np.float16)
        for layer in range(layers):  # one layer at a time: cache-sized blocks
            for c, part in enumerate((keys, values)):
                q[layer, c], scale[layer, c] = _encode(np, np.asarray(part[layer]).astype(np.float32, copy=False))
        return {"q": StoredArray(q, Q_DIMS), "scale": StoredArray(scale, KV_DIMS[:-1])}

    def decode(self, arrays: dict[str, np.ndarray], raw_dtype: str, out_dtype: Any) -> np.ndarray:
        q, scale = np.asarray(arrays["q"]), np.asarray(arrays["scale"])
        out = np.empty((*q.shape[:-1], 2 * q.shape[-1]), np.dtype(out_dtype))
        for layer in range(q.shape[0]):
            out[layer] = _decode(np, q[layer], scale[layer])
        return out

    def _device_encode(self, keys: Any, values: Any, length: Any) -> dict[str, Any]:
        import jax.numpy as jnp

        _check_head_dim(keys.shape[-1])
        q, scale = _encode(jnp, jnp.stack([keys, values], axis=1).astype(jnp.float32))
        return {"q": q, "scale": scale}

    def _device_decode(self, arrays: dict[str, Any], raw_dtype: str, out_dtype: Any) -> Any:
        import jax.numpy as jnp

        return _decode(jnp, arrays["q"], arrays["scale"]).astype(out_dtype)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "zstd_level": self.zstd_level, "decode": DECODE}
