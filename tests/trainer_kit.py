"""Shared pieces of the trainer tests: a tiny GRPO batch, its reward, model and trainer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from datasets import Dataset
from transformers import GenerationConfig

from vinekv.models import BYTE_VOCAB, build_model, build_tokenizer
from vinekv.trainer.vineppo_config import VinePPOConfig
from vinekv.trainer.vineppo_trainer import VinePPOTrainer

PROMPTS = ["Q: 12+7?\n", "Q: 3*4?\n"]
PROMPT_LEN, COMPLETION_LEN, GROUP = 16, 16, 4


def even_bytes(prompts, completions, **kwargs):
    """Fraction of the completion's bytes that are even: a reward every token moves a little."""
    return [sum(b % 2 == 0 for b in c.encode()) / max(1, len(c.encode())) for c in completions]


def every_4_chars(text: str) -> list[int]:
    return list(range(4, len(text), 4))


def fresh_model(seed: int = 0, eos: tuple[int, ...] = (BYTE_VOCAB,)):
    """A tiny random llama with a generation config (GRPO needs one), EOS ids ``eos``."""
    model = build_model("llama", seed=seed)
    eos_ids = eos[0] if len(eos) == 1 else list(eos)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=BYTE_VOCAB + 1, do_sample=True)
    return model


def left_padded_tokenizer():
    tok = build_tokenizer()
    tok.padding_side = "left"
    return tok


def trainer_settings(tmp_path, **overrides) -> dict:
    settings = dict(
        save_directory=str(tmp_path / "ckpt"),
        do_last_save=False,
        max_prompt_length=PROMPT_LEN,
        max_completion_length=COMPLETION_LEN,
        total_batch_size=len(PROMPTS),
        num_return_sequences=GROUP,
        use_esurge_generation=False,
        shuffle_train_dataset=False,
        max_training_steps=1,
        learning_rate=1e-3,
        beta=0.0,
        do_eval=False,
        use_wandb=False,
        progress_bar_type="json",
        track_memory=False,
        report_steps=1,
        log_steps=1,
        vineppo_branches=2,
        vineppo_max_depth=6,
        lite_num_branches=2,
        lite_branch_max_len=6,
        lite_anchor_stride=8,
        vineppo_unfinished_reward=None,
        vineppo_store=str(tmp_path / "kv"),
        vineppo_codec="lossless",
        vineppo_ppo_epochs=1,  # one update per batch, raw advantages: what these tests check by hand
        vineppo_whiten_advantages=False,
    )
    settings.update(overrides)
    return settings


def make_trainer(tmp_path, tokenizer, model=None, reward_funcs=even_bytes, **overrides) -> VinePPOTrainer:
    return VinePPOTrainer(
        arguments=VinePPOConfig(**trainer_settings(tmp_path, **overrides)),
        model=model or fresh_model(),
        reward_funcs=reward_funcs,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        step_splitter=every_4_chars,
    )


def prompt_batch(tokenizer) -> dict[str, jax.Array]:
    enc = tokenizer(PROMPTS, padding="max_length", max_length=PROMPT_LEN, return_tensors="np")
    return {"input_ids": jnp.asarray(enc["input_ids"]), "attention_mask": jnp.asarray(enc["attention_mask"])}
