"""int4 codec (KIVI style): asymmetric 4-bit codes, keys per channel in token groups, values per token.

KIVI (Liu et al., 2024) found that key outliers sit in fixed channels while value outliers do
not, so keys are quantised per channel over groups of ``group_size`` tokens and values per
token over ``head_dim``. Every quantisation group ``S`` (a set of float32 elements) gets

    zero  = the largest float16 <= min(S)                    (min rounded toward -inf)
    r     = float32(max(S) - float32(zero))                  (one float32 subtraction)
    scale = the smallest float16 s with float32(15 * s) >= r (r / 15 rounded toward +inf)
    code  = clip(rint(float32(x - float32(zero)) / float32(safe)), 0, 15),  safe = scale or 1 if scale == 0

and decodes as

    x' = float32(code) * float32(scale) + float32(zero)      (float32; then cast to the output dtype)

All arithmetic is float32 with round half to even. ``15 * scale`` and ``code * scale`` are exact
in float32 (4-bit times 11-bit significands), so the decode has a single rounding (an FMA gives
the same bits) and the directed roundings above can be checked exactly. Rounding ``zero`` down
and ``scale`` up (instead of to nearest) guarantees ``zero <= x <= zero + 15 * scale`` for every
element, so no code is clipped and the error bound holds with no float16 term of its own:

    |x - x'| <= scale * (1/2 + 2^-18) + 2^-23 * |x|

(``scale / 2`` from the 4-bit rounding; the rest is float32 rounding of ``x - zero``, the
quotient and the decode sum). The float16 rounding of the parameters is inside ``scale``:
``scale <= (max - min + gap) / 15 * (1 + 2^-10) + 2^-24``, where ``gap = min - zero`` is below one
float16 ulp of ``min``. A group whose elements all equal one float16 value decodes exactly
(``zero`` is that value, ``scale`` 0); bfloat16 KV in the float16 normal range is such a value.
Elements must lie within the float16 range (|x| <= 65504); beyond it parameters overflow.

Layout (token axis 2 everywhere; ``c`` = 0 keys, 1 values; ``p`` = 0 scale, 1 zero):

- ``q``            uint8   ``[layers, 2, tokens, kv_heads, head_dim // 2]``: codes of dims
  ``2i`` (low nibble) and ``2i + 1`` (high nibble) in byte ``i``; head_dim must be even.
- ``key_params``   float16 ``[layers, 2 (p), ceil(tokens / group_size), kv_heads, head_dim]``:
  the keys' parameters of group ``g`` = tokens ``[g * group_size, (g + 1) * group_size)`` of the
  node (groups start at the node's first token; a partial last group uses its real tokens).
- ``value_params`` float16 ``[layers, 2 (p), tokens, kv_heads]``: the values' per-token parameters.

A group's parameters depend on its own tokens only, so the codes of a prefix ``[0, t)`` with
the first ``ceil(t / group_size)`` key groups decode to exactly the prefix of the full decode,
whatever the node's length.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vinekv.kvstore.codecs.base import KVCodec, StoredArray, check_zstd_level, token_entries

QMAX = 15
INV_QMAX = np.float32(1 / QMAX)  # a first guess of scale only; the result is fixed by the exact ceil test

Q_DIMS = ("layer", "kv", "token", "kv_head", "head_dim_pair")
KEY_PARAM_DIMS = ("layer", "param", "token_group", "kv_head", "head_dim")
VALUE_PARAM_DIMS = ("layer", "param", "token", "kv_head")

DECODE = (
    "kv[l, c, t, h, d] = float32(code) * float32(scale) + float32(zero) in float32 arithmetic; c = 0 keys, "
    "1 values; code = (q[l, c, t, h, d // 2] >> (4 * (d % 2))) & 15 (q uint8, dim 2i in the low nibble, "
    "2i + 1 in the high one); keys: scale, zero = key_params[l, 0, g, h, d], key_params[l, 1, g, h, d] with "
    "g = t // group_size (token t counted from the node's first token); values: scale, zero = "
    "value_params[l, 0, t, h], value_params[l, 1, t, h]; params are float16 (zero = min rounded down, "
    "scale = (max - zero) / 15 rounded up)"
)


def _check_group_size(group_size: Any) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int | np.integer) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (tokens per key group), got {group_size!r}")
    return int(group_size)


def _check_head_dim(head_dim: int) -> None:
    if head_dim % 2:
        raise ValueError(f"int4 codec packs two codes per byte along head_dim, which must be even; got {head_dim}")


# -- the parameter and code arithmetic, written once for numpy and jax.numpy (`xp`) -----------------


def _floor16(xp: Any, lo: Any) -> Any:
    """The largest float16 <= ``lo`` (float32)."""
    z = lo.astype(xp.float16)
    return xp.where(z.astype(xp.float32) > lo, xp.nextafter(z, xp.float16(-np.inf)), z)


def _ceil16_div15(xp: Any, r: Any) -> Any:
    """The smallest float16 s with 15 * s >= ``r`` (float32; 15 * s is exact in float32).

    ``float16(r * float32(1/15))`` is within one float16 step of it; one step up or down fixes it.
    (Not ``r / 15``: XLA rewrites a division by a constant into a multiplication by its
    reciprocal, which differs from numpy's division in the last bit.)
    """
    s = (r * INV_QMAX).astype(xp.float16)
    up = xp.nextafter(s, xp.float16(np.inf))
    down = xp.nextafter(s, xp.float16(-np.inf))
    fifteen = xp.float32(QMAX)
    s = xp.where(fifteen * s.astype(xp.float32) < r, up, s)
    return xp.where(fifteen * down.astype(xp.float32) >= r, down, s)


def _canonical(xp: Any, x: Any) -> Any:
    """float32 ``x`` with subnormals and -0 made +0 (XLA:CPU flushes subnormals to zero; numpy
    does not), so host and device see the same numbers."""
    return xp.where(xp.abs(x) < xp.float32(np.finfo(np.float32).tiny), xp.float32(0), x)


def _params(xp: Any, lo: Any, hi: Any) -> tuple[Any, Any]:
    """(scale, zero) float16 of groups with float32 minimum ``lo`` and maximum ``hi``; NaN
    parameters (NaN in a group) are the one canonical float16 NaN."""
    zero = _floor16(xp, lo)
    scale = _ceil16_div15(xp, hi - zero.astype(xp.float32))
    nan = xp.float16(np.nan)
    return xp.where(xp.isnan(scale), nan, scale), xp.where(xp.isnan(zero), nan, zero)


def _codes(xp: Any, x: Any, scale: Any, zero: Any) -> Any:
    """uint8 codes 0..15 of float32 ``x`` given float16 parameters broadcast to its shape."""
    safe = xp.where(scale > 0, scale, xp.float16(1)).astype(xp.float32)
    return xp.clip(xp.rint((x - zero.astype(xp.float32)) / safe), 0, QMAX).astype(xp.uint8)


def _pack(q: Any) -> Any:
    return q[..., 0::2] | (q[..., 1::2] << 4)


def _dequantise(xp: Any, packed: Any, key_scale: Any, key_zero: Any, value_params: Any, out_dtype: Any) -> Any:
    """``[layers, 2, t, heads, head_dim]`` from packed codes and the parameters broadcast per token."""
    codes = xp.stack([packed & 15, packed >> 4], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    codes = codes.astype(xp.float32)
    keys = codes[:, 0] * key_scale.astype(xp.float32) + key_zero.astype(xp.float32)
    vscale, vzero = value_params[:, 0, ..., None], value_params[:, 1, ..., None]
    values = codes[:, 1] * vscale.astype(xp.float32) + vzero.astype(xp.float32)
    return xp.stack([keys, values], axis=1).astype(out_dtype)


class Int4Codec(KVCodec):
    name = "int4"
    array_names = ("q", "key_params", "value_params")

    def __init__(self, group_size: int = 32, zstd_level: int = 1):
        self.group_size = _check_group_size(group_size)
        self.zstd_level = check_zstd_level(zstd_level)

    def token_groups(self) -> dict[str, int]:
        return {"q": 1, "key_params": self.group_size, "value_params": 1}

    def dims(self, name: str) -> tuple[str, ...]:
        return {"q": Q_DIMS, "key_params": KEY_PARAM_DIMS, "value_params": VALUE_PARAM_DIMS}[name]

    # -- host --------------------------------------------------------------------------------------
    def encode(self, keys: np.ndarray, values: np.ndarray) -> dict[str, StoredArray]:
        layers, tokens, heads, head_dim = keys.shape
        _check_head_dim(head_dim)
        g = self.group_size
        groups = token_entries(tokens, g)
        k = _canonical(np, np.asarray(keys).astype(np.float32, copy=False))
        v = _canonical(np, np.asarray(values).astype(np.float32, copy=False))
        key_params = np.zeros((layers, 2, groups, heads, head_dim), np.float16)
        value_params = np.zeros((layers, 2, tokens, heads), np.float16)
        q = np.zeros((layers, 2, tokens, heads, head_dim), np.uint8)
        if tokens:
            starts = np.arange(0, tokens, g)
            key_params[:, 0], key_params[:, 1] = _params(
                np, np.minimum.reduceat(k, starts, axis=1), np.maximum.reduceat(k, starts, axis=1)
            )
            value_params[:, 0], value_params[:, 1] = _params(np, v.min(axis=-1), v.max(axis=-1))
            per_token = np.repeat(key_params, g, axis=2)[:, :, :tokens]
            q[:, 0] = _codes(np, k, per_token[:, 0], per_token[:, 1])
            q[:, 1] = _codes(np, v, value_params[:, 0, ..., None], value_params[:, 1, ..., None])
        return {
            "q": StoredArray(_pack(q), Q_DIMS),
            "key_params": StoredArray(key_params, KEY_PARAM_DIMS, g),
            "value_params": StoredArray(value_params, VALUE_PARAM_DIMS),
        }

    def decode(self, arrays: dict[str, np.ndarray], raw_dtype: str, out_dtype: Any) -> np.ndarray:
        packed, key_params = np.asarray(arrays["q"]), np.asarray(arrays["key_params"]).astype(np.float32)
        value_params = np.asarray(arrays["value_params"]).astype(np.float32)[..., None]
        layers, _, tokens, heads, pairs = packed.shape
        g, groups = self.group_size, key_params.shape[2]
        out = np.empty((layers, 2, tokens, heads, 2 * pairs), np.dtype(out_dtype))
        codes = np.zeros((2, groups * g, heads, pairs, 2), np.float32)
        for layer in range(layers):  # one layer at a time (cache-sized blocks); same float32 ops as `_dequantise`
            np.bitwise_and(packed[layer], 15, out=codes[:, :tokens, ..., 0], casting="unsafe")
            np.right_shift(packed[layer], 4, out=codes[:, :tokens, ..., 1], casting="unsafe")
            flat = codes.reshape(2, groups * g, heads, 2 * pairs)
            keys = flat[0].reshape(groups, g, heads, 2 * pairs) * key_params[layer, 0][:, None]
            keys += key_params[layer, 1][:, None]
            out[layer, 0] = keys.reshape(groups * g, heads, 2 * pairs)[:tokens]
            values = flat[1, :tokens] * value_params[layer, 0]
            values += value_params[layer, 1]
            out[layer, 1] = values
        return out

    # -- device ------------------------------------------------------------------------------------
    def _device_encode(self, keys: Any, values: Any, length: Any) -> dict[str, Any]:
        import jax.numpy as jnp

        layers, width, heads, head_dim = keys.shape
        _check_head_dim(head_dim)
        g = self.group_size
        groups = token_entries(width, g)
        k, v = _canonical(jnp, keys.astype(jnp.float32)), _canonical(jnp, values.astype(jnp.float32))
        grouped = jnp.pad(k, ((0, 0), (0, groups * g - width), (0, 0), (0, 0))).reshape(layers, groups, g, heads, -1)
        real = (jnp.arange(groups * g) < length).reshape(1, groups, g, 1, 1)
        lo = jnp.where(real, grouped, jnp.float32(np.inf)).min(axis=2)
        hi = jnp.where(real, grouped, jnp.float32(-np.inf)).max(axis=2)
        empty = lo > hi  # groups past `length` (trimmed away): any finite parameters will do
        kscale, kzero = _params(jnp, jnp.where(empty, 0, lo), jnp.where(empty, 0, hi))
        vscale, vzero = _params(jnp, v.min(axis=-1), v.max(axis=-1))
        kscale_t = jnp.repeat(kscale, g, axis=1)[:, :width]
        kzero_t = jnp.repeat(kzero, g, axis=1)[:, :width]
        q = jnp.stack([_codes(jnp, k, kscale_t, kzero_t), _codes(jnp, v, vscale[..., None], vzero[..., None])], axis=1)
        return {
            "q": _pack(q),
            "key_params": jnp.stack([kscale, kzero], axis=1),
            "value_params": jnp.stack([vscale, vzero], axis=1),
        }

    def _device_decode(self, arrays: dict[str, Any], raw_dtype: str, out_dtype: Any) -> Any:
        import jax.numpy as jnp

        packed, key_params = arrays["q"], arrays["key_params"]
        per_token = jnp.repeat(key_params, self.group_size, axis=2)[:, :, : packed.shape[2]]
        return _dequantise(jnp, packed, per_token[:, 0], per_token[:, 1], arrays["value_params"], out_dtype)

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "group_size": self.group_size,
            "zstd_level": self.zstd_level,
            "decode": DECODE,
        }
