"""Configuration of the end-to-end demo job (`vinekv demo`)."""

from __future__ import annotations

import dataclasses

from vinekv.kvstore.codecs import CODECS
from vinekv.models import FAMILIES


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sample responses, snapshot them at a few positions, resume and check agreement.

    Attributes:
      family: model family of the tiny random model (``llama``, ``qwen2``, ``qwen3``, ``mistral``).
      seed: seeds the model weights and the sampling keys.
      prompts: prompt texts (byte-level tokens).
      response_tokens: tokens sampled per response.
      temperature: sampling temperature (0 = greedy).
      snapshot_fractions: where to snapshot inside each response, as fractions of its length;
        the prompt end is always snapshotted too.
      kv_dtype: dtype of the KV cache (``float32`` or ``bfloat16``).
      store: snapshot store path; empty for a temporary one. The store's run ``demo`` is
        replaced on every run.
      codec: codec of a new store (``lossless`` resumes exactly; ``int8`` is ~2.4x,
        ``int4-hadamard`` and ``int4`` ~4x smaller than bf16).
      branches: K branches per anchor in the replay step.
      branch_max_tokens: token budget of a branch.
      anchor_stride: Lite-mode anchors every this many response tokens (plus the final token).
    """

    family: str = "llama"
    seed: int = 0
    prompts: tuple[str, ...] = (
        "Q: Tom has 3 apples and buys 5 more. How many?\nA:",
        "Q: 12 * 4 = ?\nA:",
        "Q: A train goes 60 km in 1 hour. How far in 3 hours?\nA:",
        "Q: What is 100 - 37?\nA:",
    )
    response_tokens: int = 48
    temperature: float = 1.0
    snapshot_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    kv_dtype: str = "float32"
    store: str = ""
    codec: str = "lossless"
    branches: int = 8
    branch_max_tokens: int = 16
    anchor_stride: int = 12

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "snapshot_fractions", tuple(self.snapshot_fractions))
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if not self.prompts or any(not p for p in self.prompts):
            raise ValueError("prompts must be a non-empty list of non-empty strings")
        if self.response_tokens < 2:
            raise ValueError(f"response_tokens must be >= 2, got {self.response_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if any(not 0 < f < 1 for f in self.snapshot_fractions):
            raise ValueError(f"snapshot_fractions must lie in (0, 1), got {self.snapshot_fractions}")
        for name in ("branches", "branch_max_tokens", "anchor_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        if self.kv_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"kv_dtype must be 'float32' or 'bfloat16', got {self.kv_dtype!r}")
