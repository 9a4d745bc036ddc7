"""Built-in tokenizer, config validation, and the demo job end to end."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from vinekv.cli import main
from vinekv.configs import CONFIG_DIR, DemoConfig, TrainConfig, load
from vinekv.demo import run_demo, snapshot_positions
from vinekv.models import ModelShape, build_model


def test_tokenizer_is_byte_level_and_loads_from_disk(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = "2+2=4\nwörld"
    enc = tok(text, return_offsets_mapping=True)
    assert enc["input_ids"] == list(text.encode())
    # the two bytes of 'ö' both map back to its one character
    assert enc["offset_mapping"][7:10] == [(7, 8), (7, 8), (8, 9)]
    assert tok.decode(enc["input_ids"]) == text
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (256, 257, 258)


def test_demo_toml_is_the_builtin_default():
    assert load(DemoConfig, CONFIG_DIR / "demo.toml") == DemoConfig()
    assert load(TrainConfig, CONFIG_DIR / "train.toml") == TrainConfig()


def test_train_config_merges_trainer_settings_and_refuses_unknown_ones():
    config = TrainConfig(trainer={"vineppo_mode": "lite"}, warmup={"steps": 5, "task_steps": [2, 3]})
    assert config.trainer["vineppo_mode"] == "lite" and config.trainer["vineppo_cache_strategy"] == "disk"
    assert config.warmup_config().steps == 5 and config.warmup_config().task_steps == (2, 3)
    with pytest.raises(ValueError, match=r"trainer.vineppo_brnaches: not a VinePPOConfig field \(did you mean"):
        TrainConfig(trainer={"vineppo_brnaches": 2})
    with pytest.raises(ValueError, match=r"warmup.stesp: not a WarmupConfig field \(did you mean 'steps'\?\)"):
        TrainConfig(warmup={"stesp": 2})
    with pytest.raises(ValueError, match="eval_problems must be >= 1"):
        TrainConfig(eval_problems=0)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('family = "llama"\nrespons_tokens = 3\n')
    with pytest.raises(ValueError, match=r"bad.toml: respons_tokens: not a DemoConfig field \(did you mean 'resp"):
        load(DemoConfig, bad)
    with pytest.raises(ValueError, match="family must be one of"):
        DemoConfig(family="gpt2")
    with pytest.raises(ValueError, match=r"snapshot_fractions must lie in \(0, 1\)"):
        DemoConfig(snapshot_fractions=(0.5, 1.5))
    with pytest.raises(ValueError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        ModelShape(num_key_value_heads=3)
    with pytest.raises(ValueError, match="unknown model family 'gpt2'"):
        build_model("gpt2")
    assert main(["demo", "--config", str(bad)]) == 2


def test_snapshot_positions():
    assert snapshot_positions(10, 40, (0.25, 0.5, 0.75)) == [10, 20, 30, 40]
    assert snapshot_positions(5, 2, (0.5, 0.9)) == [5]  # nothing inside a 2-token response but its start


def test_demo_resumes_exactly_from_the_store(tmp_path, capsys):
    config = DemoConfig(prompts=("Q: 1+1?\nA:", "Q: 7*6?\nA:"), response_tokens=12, store=str(tmp_path / "s"))
    report = run_demo(config)
    assert report.all_agree
    assert report.store_size.raw == 2 * 22 * 2 * 2 * 2 * 16 * 4  # 2 trajectories x 22 tokens, f32 KV
    assert [c.position for c in report.checks if c.row == 0] == [10, 13, 16, 19]
    assert max(c.max_logit_diff for c in report.checks) < 1e-5
    assert all(c.tokens_compared == 10 + 12 - c.position - 1 for c in report.checks if c.row == 0)
    # replay: anchors every 12 tokens plus the final token, values in [0, 1] written to the store
    assert report.replay.states == 2 * 2 and report.replay.branches == 2 * 2 * 8
    assert report.mc["row0"]["positions"] == [10, 21]
    assert all(0 <= v <= 1 for mc in report.mc.values() for v in mc["mean"])
    assert main(["inspect", str(tmp_path / "s"), "--run", "demo"]) == 0
    listing = capsys.readouterr().out
    assert "run demo: 2 trajectories (2 with MC values)" in listing
    row1 = next(line for line in listing.splitlines() if line.startswith("row1 "))  # 2 Lite anchors, no reward
    mean = sum(report.mc["row1"]["mean"]) / 2
    assert row1.split()[:6] == ["row1", "10", "12", "-", "2/2", f"{mean:.3f}"]
    assert row1.endswith("prompt='Q: 7*6?\\nA:'")
    assert main(["inspect", str(tmp_path / "nothing")]) == 2


def test_cli_replay_values_a_stored_run_again(tmp_path, capsys):
    """`vinekv replay` with other settings recomputes values over the demo's Lite ones."""
    store = tmp_path / "s"
    run_demo(DemoConfig(prompts=("Q: 1+1?\nA:",), response_tokens=8, store=str(store)))
    argv = [
        "replay",
        str(store),
        "--run",
        "demo",
        "--model",
        "tiny:llama:0",
        "--branches",
        "2",
        "--max-tokens",
        "3",
        "--metrics",
        str(tmp_path / "m.jsonl"),
    ]
    assert main(argv) == 0
    assert "replayed 1 trajectories (0 already valued)" in capsys.readouterr().out
    assert main(argv) == 0
    assert "replayed 0 trajectories (1 already valued)" in capsys.readouterr().out
    from vinekv.kvstore import SnapshotStore

    with SnapshotStore.open(store, mode="r") as reader:
        mc = reader.trajectory_info("demo", "row0")["fields"]["mc"]
    assert mc["mode"] == "full" and mc["count"][0] == 2 and mc["response_positions"][0] == 0
    assert main(["replay", str(store), "--run", "demo", "--model", "tiny:llama:1"]) == 2  # another policy: refused
    assert "pass allow_stale=True" in capsys.readouterr().err
