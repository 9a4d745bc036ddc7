"""The built-in arithmetic task: problems, the exact verifier, its tokenizer, the cached warm-up
and held-out accuracy against a plain full-recompute greedy decoder."""

from __future__ import annotations

import json
import random
import re

import jax.numpy as jnp
import numpy as np
import pytest

from vinekv.tasks.arithmetic import (
    ALPHABET,
    build_task_tokenizer,
    final_answer,
    make_dataset,
    make_problem,
    reward,
)
from vinekv.tasks.warmup import WarmupConfig, accuracy, load_params, warm_up


def evaluate_prompt(prompt: str) -> int:
    """The answer computed from the prompt's text alone."""
    values = {}
    *definitions, _ = prompt.strip().split(";")
    for definition in definitions:
        name, expr = definition.split("=")
        match = re.fullmatch(r"(\d+)|([a-h])([+\-*])(\d+)", expr)
        if match.group(1):
            values[name] = int(match.group(1))
        else:
            left, op, right = values[match.group(2)], match.group(3), int(match.group(4))
            values[name] = {"+": left + right, "-": left - right, "*": left * right}[op]
    return values[definitions[-1].split("=")[0]]


def test_problems_are_right_and_reproducible():
    rng = random.Random(3)
    for steps in (1, 2, 4, 7):
        prompt, solution, answer = make_problem(rng, steps, operand_max=12)
        assert prompt.count(";") == steps + 1 and prompt.endswith("=?\n")
        lines = solution.split("\n")
        assert len(lines) == steps + 1 and lines[-1] == f"#### {answer}"
        assert int(answer) == evaluate_prompt(prompt)
        assert set(prompt + solution) <= set(ALPHABET)
    data = make_dataset(50, seed=1, steps=(2, 3))
    assert data.column_names == ["prompt", "solution", "answer"] and len(data) == 50
    assert data["prompt"] == make_dataset(50, seed=1, steps=(2, 3))["prompt"]
    assert {p.count(";") - 1 for p in data["prompt"]} == {2, 3}
    assert all(int(a) == evaluate_prompt(p) for p, a in zip(data["prompt"], data["answer"], strict=True))
    with pytest.raises(ValueError, match="steps must be in"):
        make_problem(rng, 0)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("b=5\nc=0\n#### -8", 1.0),  # right
        ("b=5\nc=0\n#### -8\n", 1.0),  # a trailing newline
        ("b=5\nc=0\n####-8", 1.0),
        ("b=5\nc=0\n#### 8", 0.0),  # wrong sign
        ("b=5\nc=-8", 0.0),  # no answer line
        ("#### -8\nc=0", 0.0),  # the answer is not the last line
        ("#### -8 9", 0.0),  # trailing junk
        ("", 0.0),
        ("#### -08", 1.0),  # the integer, not the digits
    ],
)
def test_verifier_on_hand_made_completions(completion, expected):
    assert reward(["p"], [completion], ["-8"]) == [expected]


def test_final_answer():
    assert final_answer("x\n#### 12") == "12" and final_answer("#### a") is None and final_answer("\n\n") is None


def test_tokenizer_one_token_per_character():
    tok = build_task_tokenizer()
    assert (tok.pad_token_id, tok.eos_token_id, tok.padding_side) == (0, 1, "left")
    text = "a=2;b=a*1;b=?\nb=2\n#### 2"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text
    assert max(ids) < 32


@pytest.fixture(scope="module")
def short_warmup(tmp_path_factory):
    config = WarmupConfig(steps=30, train_problems=256, warmup_steps=5)
    cache = tmp_path_factory.mktemp("cache")
    return config, cache, warm_up(config, cache=cache, progress=False)


def test_warm_up_is_cached_and_reloads_the_same_policy(short_warmup):
    config, cache, first = short_warmup
    assert not first.cached and np.isfinite(first.final_loss)
    again = warm_up(config, cache=cache, progress=False)
    assert again.cached and again.path == first.path
    ids = jnp.asarray(first.tokenizer.encode("a=1;b=a+2;b=?\n", add_special_tokens=False))[None]
    with first.model.mesh:
        np.testing.assert_array_equal(first.model(input_ids=ids).logits, again.model(input_ids=ids).logits)
    other = WarmupConfig(steps=31, train_problems=256, warmup_steps=5)
    assert other.digest() != config.digest()
    from vinekv.models import ModelShape
    from vinekv.tasks.warmup import TASK_SHAPE, build_task_model

    wrong = build_task_model(ModelShape(**{**TASK_SHAPE.__dict__, "hidden_size": 64, "intermediate_size": 128}))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_params(wrong, first.path)


def test_accuracy_matches_a_plain_greedy_decoder(short_warmup):
    """`accuracy` (padded prefill + cached decode) against full recompute, one prompt at a time."""
    _, _, result = short_warmup
    model, tok = result.model, result.tokenizer
    data = make_dataset(6, seed=99)
    solved = []
    for prompt, answer in zip(data["prompt"], data["answer"], strict=True):
        ids = tok.encode(prompt, add_special_tokens=False)
        out = []
        with model.mesh:
            for _ in range(24):
                seq = ids + out  # right-padded to one width (causal: padding after it changes nothing)
                padded = jnp.asarray([seq + [tok.pad_token_id] * (64 - len(seq))])
                nxt = int(np.asarray(model(input_ids=padded).logits)[0, len(seq) - 1].argmax())
                if nxt == tok.eos_token_id:
                    break
                out.append(nxt)
        solved.append(reward([prompt], [tok.decode(out)], [answer])[0])
    assert accuracy(model, tok, data, max_new_tokens=24, batch_size=4) == pytest.approx(np.mean(solved))


def test_the_training_job_end_to_end(tmp_path, monkeypatch, capsys):
    """`vinekv train` on a short warm-up: accuracies before/after, the store's runs, the plot."""
    from vinekv.cli import main

    monkeypatch.setenv("VINEKV_CACHE", str(tmp_path / "cache"))
    config = tmp_path / "train.toml"
    config.write_text(
        f'output = "{tmp_path / "out"}"\neval_problems = 8\ntrain_problems = 64\n'
        "[warmup]\nsteps = 20\ntrain_problems = 256\nwarmup_steps = 5\n"
        "[trainer]\nmax_training_steps = 2\ntotal_batch_size = 2\nvineppo_branches = 2\n"
    )
    assert main(["train", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy (8 problems):" in out and "1 runs kept, one per batch" in out
    assert "(standard error, paired by problem)" in out
    assert (tmp_path / "out" / "vinekv-train.png").stat().st_size > 0
    (entry,) = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert entry["step"] == 2 and {"loss", "policy_kl", "mean_entropy", "vineppo/advantage_nonzero"} <= set(entry)
    from vinekv.kvstore import SnapshotStore

    with SnapshotStore.open(tmp_path / "out" / "kv", mode="r") as store:
        (run,) = store.runs()
        info = store.trajectory_info(run, store.trajectories(run)[0])
    assert "answer" in info["fields"] and "mc" in info["fields"]  # the task's answer went into the store
    assert (tmp_path / "cache").is_dir()


def test_a_resumed_run_continues_from_the_saved_step(tmp_path, monkeypatch):
    """Stopped after 1 batch (2 PPO updates) and resumed to 2 batches, a run equals one run of
    2 batches: same step numbers, the next batch's problems, the same sampling keys and weights."""
    from vinekv.configs import TrainConfig
    from vinekv.train import run_training

    monkeypatch.setenv("VINEKV_CACHE", str(tmp_path / "cache"))

    def train(output: str, steps: int, resume: bool = False):
        config = TrainConfig(
            output=str(tmp_path / output),
            eval_problems=4,
            train_problems=64,
            plot=False,
            resume=resume,
            warmup={"steps": 20, "train_problems": 256, "warmup_steps": 5},
            trainer={"max_training_steps": steps, "total_batch_size": 2, "vineppo_branches": 2},
        )
        return run_training(config, progress=False)

    whole = train("whole", 4)
    first = train("parts", 2)
    assert [h["step"] for h in first.history] == [2] and first.checkpoint.endswith("run-2")
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train("parts", 4)
    with pytest.raises(ValueError, match="no checkpoint"):
        train("nothing", 4, resume=True)
    resumed = train("parts", 4, resume=True)
    assert resumed.start_step == 2 and [h["step"] for h in resumed.history] == [4]
    assert resumed.checkpoint.endswith("run-4")
    for key in ("vineppo/trajectory_reward_mean", "vineppo/mc_value_mean", "loss"):
        assert resumed.history[0][key] == pytest.approx(whole.history[1][key], rel=1e-5, abs=1e-6), key
    assert resumed.after == whole.after
    steps = [json.loads(line)["step"] for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]  # the resumed run appended to the first run's metrics
