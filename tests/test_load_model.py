"""`vinekv.models.load_model`: a Hugging Face model folder (config.json + safetensors + tokenizer)
loaded through EasyDeL's converter gives the same logits and greedy tokens as ``transformers``.

The folders hold tiny randomly initialised models that ``transformers`` writes with torch on CPU
(Llama with separate embeddings; Qwen2 with tied embeddings and q/k/v biases, as Qwen2.5-0.5B).
"""

from __future__ import annotations

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vinekv.models import BYTE_VOCAB, TINY_VOCAB, build_tokenizer, load_model
from vinekv.replay.decode import decode, prefill

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# float32 on both sides. Weights are drawn with std 0.1 (Llama) / 0.2 (Qwen2, whose tied embeddings
# otherwise make it repeat its input): with HF's default 0.02 a random model repeats one token and
# its attention is nearly uniform. Measured max |logit diff|: 2.9e-6 (Llama, |logit| < 3) and
# 1.6e-5 (Qwen2, |logit| < 6.4); torch float32 vs float64 is ~1e-6. With EasyDeL's own bfloat16
# RoPE table (what `set_rope_table_dtype` replaces) it is 5.7e-3 / 5.2e-2, and greedy tokens differ
# from transformers' once weights are a little larger.
LOGIT_ATOL = 1e-4
NEW_TOKENS = 16
SHAPE = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    eos_token_id=BYTE_VOCAB,
    pad_token_id=BYTE_VOCAB + 1,
    bos_token_id=None,
)


def _write_folder(folder, family: str):
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(**SHAPE, initializer_range=0.1, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**SHAPE, initializer_range=0.2, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # HF initialises biases to zero: make them matter
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.2)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer(folder)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (folder, torch model); Qwen2's folder has no generation_config.json."""
    out = {}
    for family in ("llama", "qwen2"):
        folder = tmp_path_factory.mktemp(family)
        out[family] = folder, _write_folder(folder, family)
    (out["qwen2"][0] / "generation_config.json").unlink()
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request, folders):
    """(torch model, EasyDeL model, tokenizer, folder) of one family."""
    folder, torch_model = folders[request.param]
    model, tokenizer = load_model(folder, dtype=jnp.float32, kv_dtype=jnp.float32)
    return torch_model, model, tokenizer, folder


def test_logits_match_transformers(pair):
    torch_model, model, _, _ = pair
    ids = np.random.default_rng(3).integers(0, BYTE_VOCAB, size=(2, 40)).astype(np.int32)
    with model.mesh:
        ours = np.asarray(model(input_ids=jnp.asarray(ids)).logits)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(ids).long()).logits.numpy()
    assert ours.shape == theirs.shape == (2, 40, TINY_VOCAB)
    diff = float(np.abs(ours - theirs).max())
    print(f"max |logit diff| = {diff:.2e} (logit scale {np.abs(theirs).max():.2f})")
    assert diff < LOGIT_ATOL
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_decoding_matches_transformers_generate(pair):
    torch_model, model, tokenizer, _ = pair
    prompts = ["The answer is", "2+2=4, 3+3=", "Hello"]
    rows = [tokenizer(p)["input_ids"] for p in prompts]
    lens = np.array([len(r) for r in rows], dtype=np.int32)
    width = int(lens.max())
    padded = np.zeros((len(rows), width), dtype=np.int32)
    for b, r in enumerate(rows):
        padded[b, : len(r)] = r  # right-padded: `prefill` positions each row at its own length
    cache, logits = prefill(model, padded, lens, max_length=width + NEW_TOKENS)
    ours = decode(model, cache, logits, NEW_TOKENS, temperature=0.0).tokens
    for b, r in enumerate(rows):
        with torch.no_grad():
            out = torch_model.generate(
                torch.tensor([r]),
                attention_mask=torch.ones(1, len(r), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,  # a random model may emit eos: keep going, as decode does
                eos_token_id=None,
                pad_token_id=BYTE_VOCAB + 1,
            )
        theirs = out[0, len(r) :].numpy()
        assert theirs.shape == (NEW_TOKENS,)
        np.testing.assert_array_equal(ours[b], theirs)
    assert max(len(set(row)) for row in ours.tolist()) >= 8  # not a model that repeats one token


def test_rope_table_is_float32_and_matters(pair):
    """The float32 RoPE table is EasyDeL's own up to its bfloat16 cast, survives split/merge, and
    is what makes the logits match: with EasyDeL's bfloat16 table they are far off."""
    torch_model, model, _, _ = pair
    ours = model.model.frequencies.get_value()
    easydel = model.config.get_basic_frequencies().get_value()
    assert ours.dtype == jnp.float32 and easydel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours.astype(jnp.bfloat16)), np.asarray(easydel))
    graphdef, graphstate, graphother = model.split_module()
    assert model.merge_module(graphdef, graphstate, graphother).model.frequencies.get_value().dtype == jnp.float32

    ids = np.random.default_rng(4).integers(0, BYTE_VOCAB, size=(1, 40)).astype(np.int32)
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(ids).long()).logits.numpy()
    bf16_model = model.merge_module(graphdef, graphstate, graphother)
    bf16_model.model.frequencies = nnx.data(model.config.get_basic_frequencies())
    with model.mesh:
        off = np.abs(np.asarray(bf16_model(input_ids=jnp.asarray(ids)).logits) - theirs).max()
    print(f"with bfloat16 RoPE table: max |logit diff| = {off:.2e}")
    assert off > 20 * LOGIT_ATOL


def test_generation_config_and_tokenizer(pair):
    _, model, tokenizer, folder = pair
    assert model.generation_config is not None
    assert model.generation_config.eos_token_id == BYTE_VOCAB == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == BYTE_VOCAB + 1 == tokenizer.pad_token_id
    assert tokenizer.padding_side == "left"
    assert model.config.attn_dtype == jnp.float32 and model.config.kvdtype == jnp.float32
    assert (folder / "generation_config.json").is_file() == (model.config.model_type == "llama")


def test_clear_errors(tmp_path, folders):
    folder = folders["llama"][0]
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"model folder {missing} does not exist")):
        load_model(missing)

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"model folder {no_config} has no config.json")):
        load_model(no_config)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(folder, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"model folder {no_weights} has no weights: expected one of")
    ):
        load_model(no_weights)

    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(folder, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()  # transformers alone would build an empty tokenizer
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"model folder {no_tokenizer} has no tokenizer: expected one of")
    ):
        load_model(no_tokenizer)

    (no_weights / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match=r"names missing weight shards \['model-00001-of-00002"):
        load_model(no_weights)

    not_a_folder = folder / "config.json"
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        load_model(not_a_folder)


def test_a_loaded_model_trains_one_vineppo_step(tmp_path, folders):
    """The loaded model, tokenizer and generation config go straight into the trainer (GRPO
    rollouts, MC branches, one update), and the float32 RoPE table stays float32."""
    from trainer_kit import make_trainer

    model, tokenizer = load_model(folders["llama"][0], dtype=jnp.float32, kv_dtype=jnp.float32)
    trainer = make_trainer(tmp_path, tokenizer, model=model, vineppo_mode="full", max_training_steps=1)
    state = trainer.train().state
    assert int(jax.device_get(state.step)) == 1
    assert state.model.model.frequencies.get_value().dtype == jnp.float32
