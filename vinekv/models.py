"""Model and tokenizer factories: tiny random EasyDeL causal LMs, a byte-level tokenizer, and
`load_model` for a real model in a local Hugging Face folder.

Nothing is downloaded. The tokenizer maps each UTF-8 byte to one token (ids 0-255, GPT-2's
byte-to-unicode alphabet) plus ``<|eos|>`` (256) and ``<|pad|>`` (257); its offsets map tokens
back to characters, which step splitting needs.
"""

from __future__ import annotations

import dataclasses
import json
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


# Weight files of a Hugging Face model folder, in the order EasyDeL's converter looks for them.
HF_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# Vocabulary files a tokenizer is built from (tokenizer_config.json alone is not one: transformers
# 5 then silently builds an empty tokenizer).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_model(
    path: str | Path,
    *,
    dtype: Any = jnp.bfloat16,
    param_dtype: Any = None,
    kv_dtype: Any = None,
    attn_mechanism: str = "vanilla",
    sharding_axis_dims: tuple[int, ...] | None = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Loads a causal LM and its tokenizer from a local Hugging Face model folder.

    The folder holds ``config.json``, the weights (``model.safetensors``, sharded
    ``model.safetensors.index.json`` + shards, or the ``pytorch_model.bin`` equivalents), the
    tokenizer files and optionally ``generation_config.json``: what ``save_pretrained`` or
    ``hf download`` writes. Nothing is downloaded (``local_files_only``).

    The weights go through EasyDeL's own converter
    (``easydel.AutoEasyDeLModelForCausalLM.from_pretrained(..., from_torch=True)``) in its
    ``streaming`` mode: tensors are read from the safetensors files one at a time and cast
    straight to ``param_dtype`` (EasyDeL's default ``full`` mode first builds the torch model in
    float16: float32 weights are rounded, bfloat16 ones outside float16's range overflow).

    Args:
      path: the model folder.
      dtype: compute dtype (``jnp.bfloat16`` for real runs, ``jnp.float32`` for exact checks).
      param_dtype: dtype the weights are stored in (default ``dtype``).
      kv_dtype: dtype of the KV cache (default ``dtype``). Attention is computed in it too:
        EasyDeL's default ``attn_dtype`` is bfloat16 whatever the KV dtype, which makes a
        cached and an uncached forward round differently (see `build_model`).
      attn_mechanism: EasyDeL attention kernel (``"vanilla"`` everywhere; ``"flash_attn2"``,
        ``"ragged_page_attention_v3"``... where the accelerator supports them).
      sharding_axis_dims: mesh sizes for EasyDeL's ``("dp", "fsdp", "ep", "tp", "sp")`` axes
        (default ``(1, -1, 1, 1, 1)``: every device on fsdp); e.g. ``(1, 1, 1, 8, 1)`` for 8-way
        tensor parallelism.
      **kwargs: passed on to EasyDeL's ``from_pretrained`` (``precision``, ``partition_rules``,
        ``quantization_config``, ...); a ``config_kwargs`` dict is merged over the attention
        settings above.

    Fidelity: the RoPE table is kept in ``dtype`` (`set_rope_table_dtype`; EasyDeL's own is
    bfloat16 whatever ``dtype`` is), so in float32 the logits equal ``transformers``' float32
    logits to ~1e-5 and greedy tokens agree (tests/test_load_model.py).

    Returns:
      ``(model, tokenizer)``. The model's ``generation_config`` is the folder's
      ``generation_config.json`` when present, else built from ``config.json``'s eos/pad ids
      (EasyDeL's GRPO needs one); a missing eos/pad id is taken from the tokenizer (pad falls
      back to eos). The tokenizer pads on the left (prompts for generation) and, if it has no
      pad token, pads with its eos token.

    Example::

        import jax.numpy as jnp
        from vinekv.models import load_model

        # e.g. after `hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir ~/models/qwen2.5-0.5b`
        model, tokenizer = load_model("~/models/qwen2.5-0.5b", dtype=jnp.bfloat16)
        ids = tokenizer(["2+2="], return_tensors="np").input_ids
        with model.mesh:
            logits = model(input_ids=jnp.asarray(ids)).logits

    Raises:
      FileNotFoundError: the folder, its ``config.json``, its weights (or a shard an index names)
        or its tokenizer's vocabulary file are missing; the message names the folder and what
        is missing (checked before anything is loaded).
    """
    folder = _check_model_folder(path)
    import easydel as ed
    from transformers import AutoTokenizer, GenerationConfig

    kv_dtype = dtype if kv_dtype is None else kv_dtype
    config_kwargs = {"attn_mechanism": attn_mechanism, "kvdtype": kv_dtype, "attn_dtype": kv_dtype}
    config_kwargs.update(kwargs.pop("config_kwargs", None) or {})
    if sharding_axis_dims is not None:
        kwargs["sharding_axis_dims"] = tuple(sharding_axis_dims)
    kwargs.setdefault("torch_load_mode", "streaming")
    kwargs.setdefault("verbose", False)
    model = ed.AutoEasyDeLModelForCausalLM.from_pretrained(
        str(folder),
        dtype=dtype,
        param_dtype=dtype if param_dtype is None else param_dtype,
        config_kwargs=config_kwargs,
        from_torch=True,
        local_files_only=True,
        **kwargs,
    )
    set_rope_table_dtype(model, dtype)

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token

    if (folder / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    else:
        generation_config = GenerationConfig(
            eos_token_id=getattr(model.config, "eos_token_id", None),
            pad_token_id=getattr(model.config, "pad_token_id", None),
            bos_token_id=getattr(model.config, "bos_token_id", None),
        )
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = tokenizer.eos_token_id
    if generation_config.pad_token_id is None:
        pad = tokenizer.pad_token_id
        eos = generation_config.eos_token_id
        generation_config.pad_token_id = pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)
    model.generation_config = generation_config
    return model, tokenizer


def set_rope_table_dtype(model: Any, dtype: Any) -> bool:
    """Keeps ``model``'s RoPE cos/sin table in ``dtype`` instead of EasyDeL's bfloat16.

    EasyDeL 0.3.0 casts the table to bfloat16 whatever the model's dtype
    (``EasyDeLBaseConfig.get_basic_frequencies``): a float32 model then rotates queries and keys
    with 3-digit cosines: on tiny random models its logits drift from ``transformers``' float32
    ones by 6e-3 to 5e-2 (1e-5 with a float32 table), enough to flip greedy tokens. ``transformers`` computes the table
    in float32 and casts it to the activations' dtype, which this matches; for bfloat16 nothing
    changes. The table is the base model's ``frequencies`` (computed exactly as EasyDeL does,
    then cast), stored as an ``nnx`` cache variable so it travels through ``split``/``merge``.

    Returns whether the table was replaced (False for bfloat16).
    """
    import jax
    from easydel.infra.base_module import EasyDeLBaseModule
    from easydel.infra.utils import ModuleCaches
    from easydel.layers import get_frequencies
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    if jnp.dtype(dtype) == jnp.bfloat16:
        return False
    # the base model (``model.model`` of a ``...ForCausalLM``) reads ``self.frequencies``
    bases = [node for path, node in nnx.iter_graph(model) if path and isinstance(node, EasyDeLBaseModule)]
    for base in bases or [model]:
        config = base.config
        if not hasattr(config, "rope_theta"):  # e.g. a vision tower without RoPE
            continue
        table = get_frequencies(
            head_size=config.head_dim,
            rotary_dim=config.head_dim,
            max_position=config.granted_freq_max_position_embedding,
            base=config.rope_theta,
            rope_scaling=config._get_rope_config().to_dict(),
            partial_rotary_factor=getattr(config, "partial_rotary_factor", 1.0),
        ).astype(dtype)
        replicated = NamedSharding(config.mesh, PartitionSpec())
        base.frequencies = nnx.data(ModuleCaches(jax.device_put(table, replicated)))
    return True


def _check_model_folder(path: str | Path) -> Path:
    """``path`` as an absolute folder holding config.json and weights, or a clear error."""
    folder = Path(path).expanduser().resolve()
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"model path {folder} is not a folder (expected a Hugging Face model folder)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json (is it a Hugging Face model folder?)")
    weights = next((name for name in HF_WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        present = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise FileNotFoundError(
            f"model folder {folder} has no weights: expected one of {', '.join(HF_WEIGHT_FILES)} (found: {present})"
        )
    if not any((folder / name).is_file() for name in HF_TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model folder {folder} has no tokenizer: expected one of {', '.join(HF_TOKENIZER_FILES)}"
        )
    if weights.endswith(".index.json"):
        shards = sorted(set(json.loads((folder / weights).read_text()).get("weight_map", {}).values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if not shards or missing:
            raise FileNotFoundError(
                f"model folder {folder}: {weights} names missing weight shards {missing}"
                if missing
                else f"model folder {folder}: {weights} has no weight_map"
            )
    return folder
