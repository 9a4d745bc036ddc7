"""The real-run path of `vinekv train` (task ``gsm8k``): a Hugging Face model folder written by
``transformers`` and GSM8K-format JSONL written here, through the same job as the templates in
``configs/qwen2.5-*-gsm8k.toml``."""

from __future__ import annotations

import json

import pytest

from vinekv.cli import main
from vinekv.configs import CONFIG_DIR, TrainConfig, load

pytest.importorskip("transformers")

QUESTIONS = [("What is 2+3?", "2+3=5\n#### 5"), ("What is 4+4?", "4+4=8\n#### 8"), ("What is 9-2?", "9-2=7\n#### 7")]


@pytest.mark.parametrize("template", sorted(CONFIG_DIR.glob("qwen2.5-*-gsm8k.toml")), ids=lambda p: p.name)
def test_templates_are_valid_configs_that_name_what_they_need(template, capsys):
    from vinekv.trainer.vineppo_config import VinePPOConfig

    config = load(TrainConfig, template)
    assert config.task == "gsm8k" and config.trainer["vineppo_mode"] == "full"
    VinePPOConfig(**{k: v for k, v in config.trainer.items()}, vineppo_store="kv")  # the trainer accepts its fields
    assert "NEEDS ON DISK" in template.read_text()
    assert main(["train", "--config", str(template)]) == 2  # no weights here: a clear error, nothing trained
    assert "does not exist: task 'gsm8k' needs the model folder" in capsys.readouterr().err


def test_gsm8k_job_on_a_local_model_folder(tmp_path, capsys):
    from test_load_model import _write_folder

    from vinekv.kvstore import SnapshotStore

    _write_folder(tmp_path / "model", "llama")
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    config = tmp_path / "run.toml"
    config.write_text(
        f'task = "gsm8k"\nmodel = "{tmp_path / "model"}"\ndtype = "float32"\n'
        f'train_data = "{data}"\neval_data = "{data}"\nprompt_template = "Q: {{question}}\\nA:"\n'
        f'eval_problems = 2\neval_max_tokens = 8\noutput = "{tmp_path / "out"}"\nplot = false\n'
        "[trainer]\nmax_training_steps = 2\ntotal_batch_size = 2\nnum_return_sequences = 2\n"
        "vineppo_branches = 2\nmax_prompt_length = 32\nmax_completion_length = 12\n"
    )
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"vinekv train: gsm8k ({data}), model {tmp_path / 'model'} (float32)" in out
    assert "held-out accuracy (2 problems):" in out and "paired by problem" in out and "run-2" in out
    with SnapshotStore.open(tmp_path / "out" / "kv", mode="r") as store:
        (run,) = store.runs()
        infos = [store.trajectory_info(run, t) for t in store.trajectories(run)]
        recipe = store.run_fields(run)["vinekv_rollout"]  # the trainer records how it sampled
    assert (recipe["horizon"], recipe["temperature"], recipe["policy"], recipe["reward"]) == (12, 1.0, None, None)
    assert len(infos) == 4  # 2 prompts x 2 responses
    assert {i["fields"]["answer"] for i in infos} == {"5", "8"} and all("mc" in i["fields"] for i in infos)
    with pytest.raises(ValueError, match=r"task 'gsm8k' needs \['eval_data', 'train_data'\]"):
        TrainConfig(task="gsm8k", model=str(tmp_path / "model"))
    with pytest.raises(ValueError, match="are for task 'gsm8k'"):
        TrainConfig(model=str(tmp_path / "model"))
