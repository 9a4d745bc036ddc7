"""Built-in model and tokenizer factories: tiny random EasyDeL causal LMs and a byte-level tokenizer.

Nothing is downloaded. The tokenizer maps each UTF-8 byte to one token (ids 0-255, GPT-2's
byte-to-unicode alphabet) plus ``<|eos|>`` (256) and ``<|pad|>`` (257); its offsets map tokens
back to characters, which step splitting needs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax.numpy as jnp

EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
BYTE_VOCAB = 256
TINY_VOCAB = 260  # 256 bytes + eos + pad, rounded up to a multiple of 4

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Shape of a decoder-only transformer (fields as in HF configs)."""

    vocab_size: int = TINY_VOCAB
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"ModelShape.{field.name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )


TINY = ModelShape()
# Qwen2-0.5B's attention/KV geometry (24 layers, 14 heads, 2 kv heads, head_dim 64) with a
# small vocabulary and MLP, for KV-size benchmarks where only the cache shape matters.
QWEN2_0P5B_KV = ModelShape(
    vocab_size=TINY_VOCAB,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
)


def build_model(
    family: str = "llama",
    shape: ModelShape = TINY,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
    kv_dtype: Any = jnp.float32,
    attn_mechanism: str = "vanilla",
    eos_token_id: int = BYTE_VOCAB,
    pad_token_id: int = BYTE_VOCAB + 1,
) -> Any:
    """A randomly initialised EasyDeL causal LM of the given family and shape (special token ids
    default to the byte tokenizer's)."""
    import easydel as ed
    from flax import nnx

    classes = {
        "llama": (ed.LlamaConfig, ed.LlamaForCausalLM),
        "qwen2": (ed.Qwen2Config, ed.Qwen2ForCausalLM),
        "qwen3": (ed.Qwen3Config, ed.Qwen3ForCausalLM),
        "mistral": (ed.MistralConfig, ed.MistralForCausalLM),
    }
    if family not in classes:
        raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")
    config_cls, model_cls = classes[family]
    fields = {k: v for k, v in dataclasses.asdict(shape).items() if v is not None}
    config = config_cls(**fields, eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=None)
    # attn_dtype: EasyDeL's default is bfloat16 even with float32 KV, which makes attention rounding
    # depend on the padded width (a chunk captured at width 64 != the same tokens alone); attention
    # in the KV dtype keeps a cached and an uncached forward rounding alike
    config.add_basic_configurations(attn_mechanism=attn_mechanism, kvdtype=kv_dtype, attn_dtype=kv_dtype)
    return model_cls(config=config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(seed))


def build_tokenizer(save_dir: str | Path | None = None) -> Any:
    """The byte-level tokenizer as a transformers ``PreTrainedTokenizerFast``.

    When ``save_dir`` is given it is saved there with ``save_pretrained`` (engines that load a
    tokenizer by path, like eSurge, need this).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    assert tokenizer.eos_token_id == BYTE_VOCAB and tokenizer.pad_token_id == BYTE_VOCAB + 1
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def build_bpe_tokenizer(corpus: list[str], vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained on ``corpus`` (multi-character tokens, merges may span
    newlines), with the byte tokenizer's ``<|eos|>`` and ``<|pad|>`` as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's byte-to-unicode map for one alphabet character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    code = ord(ch)
    if code in printable:
        return code
    missing = [b for b in range(256) if b not in printable]
    return missing[code - 256]
