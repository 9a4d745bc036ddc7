"""KV snapshots as host data: the layout descriptor and the `CachedState` container.

A snapshot at position ``t`` holds, for every decoder layer, the keys and values of token
positions ``[0, t)`` exactly as the model's dense KV cache holds them (keys after RoPE), plus
the token ids they were computed from and the fingerprint of the policy that computed them.

Shapes: ``keys``/``values`` are ``[num_layers, batch, t, num_kv_heads, head_dim]``;
``token_ids`` is ``[batch, t]`` (int32).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class KVLayout:
    """What a snapshot's KV arrays mean and which models can consume them.

    Attributes:
      num_layers: decoder layers (first axis of the KV arrays).
      num_kv_heads: key/value heads per layer.
      head_dim: size of one head.
      dtype: numpy dtype name of the stored K/V (``"float32"``, ``"bfloat16"``, ...).
      vocab_size: the model's vocabulary size (token ids index it).
      model_type: the EasyDeL/HF ``model_type`` (``"llama"``, ``"qwen2"``, ...).
      keys_post_rope: keys are stored after the rotary embedding was applied (EasyDeL's dense
        cache does this), so resuming needs no re-rotation.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    vocab_size: int
    model_type: str
    keys_post_rope: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> KVLayout:
        return cls(**fields)

    def check_compatible(self, other: KVLayout, what: str = "snapshot") -> None:
        """Raises ValueError naming every structural field where ``other`` differs.

        The dtype is not structural: K/V are cast to the consumer's cache dtype.
        """
        fields = ("model_type", "num_layers", "num_kv_heads", "head_dim", "vocab_size", "keys_post_rope")
        diffs = [
            f"{name}: {what} has {getattr(self, name)!r}, model has {getattr(other, name)!r}"
            for name in fields
            if getattr(self, name) != getattr(other, name)
        ]
        if diffs:
            raise ValueError(f"{what} layout does not match the model: " + "; ".join(diffs))


@dataclasses.dataclass(frozen=True)
class CachedState:
    """Keys/values of positions ``[0, position)`` for ``batch`` sequences, on the host.

    Attributes:
      keys: ``[num_layers, batch, position, num_kv_heads, head_dim]``, post-RoPE.
      values: same shape as ``keys``.
      token_ids: ``[batch, position]`` int32, the tokens the KV was computed from.
      layout: the `KVLayout` describing the arrays.
      fingerprint: `policy_fingerprint` of the model that produced the KV.
    """

    keys: np.ndarray
    values: np.ndarray
    token_ids: np.ndarray
    layout: KVLayout
    fingerprint: str

    def __post_init__(self) -> None:
        if self.keys.shape != self.values.shape:
            raise ValueError(f"keys {self.keys.shape} and values {self.values.shape} differ in shape")
        if self.keys.ndim != 5:
            raise ValueError(f"keys must be [layers, batch, t, kv_heads, head_dim], got shape {self.keys.shape}")
        num_layers, batch, position, heads, head_dim = self.keys.shape
        expected = (self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim)
        if (num_layers, heads, head_dim) != expected:
            raise ValueError(
                f"keys shape {self.keys.shape} disagrees with layout (layers, kv_heads, head_dim) = {expected}"
            )
        if self.token_ids.shape != (batch, position):
            raise ValueError(f"token_ids shape {self.token_ids.shape} != (batch, position) = {(batch, position)}")
        if str(self.keys.dtype) != self.layout.dtype:
            raise ValueError(f"keys dtype {self.keys.dtype} disagrees with layout dtype {self.layout.dtype}")

    @property
    def position(self) -> int:
        """Number of token positions covered (the snapshot is of the prefix ``[0, position)``)."""
        return self.keys.shape[2]

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of K and V together."""
        return self.keys.nbytes + self.values.nbytes

    def select(self, rows: int | slice | list[int] | np.ndarray) -> CachedState:
        """The snapshot of the chosen batch rows (an int keeps a batch axis of 1)."""
        idx = np.atleast_1d(np.arange(self.batch)[rows])
        return dataclasses.replace(
            self, keys=self.keys[:, idx], values=self.values[:, idx], token_ids=self.token_ids[idx]
        )

    def prefix(self, t: int) -> CachedState:
        """The snapshot of positions ``[0, t)``, 1 <= t <= position."""
        if not 1 <= t <= self.position:
            raise ValueError(f"prefix length {t} outside [1, {self.position}]")
        return dataclasses.replace(
            self, keys=self.keys[:, :, :t], values=self.values[:, :, :t], token_ids=self.token_ids[:, :t]
        )


@dataclasses.dataclass(frozen=True)
class EncodedState:
    """One trajectory's KV already encoded by a codec (on the device), ready to spill.

    The prompt ``[0, prompt_len)`` and the response ``[prompt_len, position)`` are encoded
    separately, as the store keeps them in separate nodes (a codec that groups tokens groups
    each part from its own start).

    Attributes:
      prompt, response: the codec's stored arrays (token axis 2) of each part.
      codec: the codec's spec.
      token_ids: ``[1, position]`` int32.
      prompt_len: tokens of the prompt part.
      layout: the `KVLayout` of the KV before encoding.
      fingerprint: `policy_fingerprint` of the model that produced the KV.
    """

    prompt: dict[str, Any]
    response: dict[str, Any]
    codec: dict[str, Any]
    token_ids: np.ndarray
    prompt_len: int
    layout: KVLayout
    fingerprint: str

    @property
    def position(self) -> int:
        return self.token_ids.shape[1]

    @property
    def batch(self) -> int:
        return self.token_ids.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the codes of both parts."""
        return sum(a.data.nbytes for part in (self.prompt, self.response) for a in part.values())
