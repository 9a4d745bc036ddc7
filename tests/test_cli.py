"""The `vinekv` command line as a user meets its errors: options and config files checked before
any model loads, errors naming the option or the file and key (with "did you mean"), one line on
stderr and exit 2; interrupts end with one line and exit 130; a resume with nothing to do says so."""

from __future__ import annotations

import re

import numpy as np
import pytest
from _store_worker import PROMPT_LEN, synthetic_state

from vinekv.cli import INTERRUPTED, main
from vinekv.compare import CompareConfig, format_comparison
from vinekv.kvstore import SnapshotStore


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("seed = 1\neval_problems = = 4\n", r"train\.toml: not valid TOML: .*\(at line 2, column \d+\)"),
        ('[trainer]\nvineppo_branches = "four"\n', r"train\.toml: trainer\.vineppo_branches = 'four': expected int"),
        ("[trainer]\nvineppo_brances = 4\n", r"trainer\.vineppo_brances: .*\(did you mean 'vineppo_branches'\?\)"),
        (
            "eval_problms = 4\n",
            r"train\.toml: eval_problms: not a TrainConfig field \(did you mean 'eval_problems'\?\)",
        ),
        ('seed = "zero"\n', r"train\.toml: seed = 'zero': expected int"),
        ("[trainer]\nvineppo_branches = 0\n", r"train\.toml: trainer: invalid VinePPOConfig: vineppo_branches must be"),
        ("[warmup]\nstep = 3\n", r"train\.toml: warmup\.step: not a WarmupConfig field \(did you mean 'steps'\?\)"),
    ],
)
def test_a_bad_config_file_is_refused_naming_the_file_and_key(tmp_path, capsys, toml, message):
    config = tmp_path / "train.toml"
    config.write_text(toml)
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert re.search(message, _error(capsys)), message
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_a_missing_config_file_is_named(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.toml")]) == 2
    assert _error(capsys) == f"vinekv train: error: config file {tmp_path / 'nope.toml'} does not exist"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--steps", "0"], "vinekv train: error: argument --steps: must be >= 1, got 0"),
        (["train", "--steps", "three"], "argument --steps: expected an integer, got 'three'"),
        (["train", "--stpes", "3"], "unrecognized arguments: --stpes 3 (did you mean '--steps'?)"),
        (
            ["train", "--mode", "ful"],
            "invalid choice: 'ful' (choose from 'off', 'lite', 'full') (did you mean 'full'?)",
        ),
        (["trian"], "(did you mean 'train'?)"),
        (["rollout", "s", "--run", "r", "--top-p", "1.5"], "argument --top-p: must be <= 1, got 1.5"),
        (["rollout", "s", "--run", "r", "--temperature", "0"], "argument --temperature: must be > 0, got 0"),
        (["replay", "s", "--run", "r", "--branches", "0"], "argument --branches: must be >= 1, got 0"),
        (["compare", "--seeds", "-1"], "argument --seeds: must be >= 1, got -1"),
    ],
)
def test_a_bad_option_is_refused_naming_it(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert message in _error(capsys)


@pytest.fixture
def store_with_a_run(tmp_path):
    path = tmp_path / "kv"
    with SnapshotStore.open(path, codec="lossless", chunk_tokens=64) as store:
        store.spill("rollout1", "t0", synthetic_state(0, length=80), PROMPT_LEN)
    return path


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        ("nosuchpkg.rewards:score", "'nosuchpkg.rewards:score': no module named 'nosuchpkg' (is it on PYTHONPATH?)"),
        ("math:nosuch", "'math:nosuch': module 'math' has no attribute 'nosuch'"),
        ("math", "expected 'package.module:attribute', got 'math'"),
    ],
)
def test_a_reward_spec_that_does_not_load_is_one_line(store_with_a_run, capsys, reward, message):
    assert main(["replay", str(store_with_a_run), "--run", "rollout1", "--reward", reward]) == 2
    assert _error(capsys) == f"vinekv replay: error: {message}"


def test_replay_of_a_missing_run_names_the_runs_there(store_with_a_run, capsys):
    assert main(["replay", str(store_with_a_run), "--run", "rollout2", "--reward", "letters"]) == 2
    assert _error(capsys) == (
        f"vinekv replay: error: no run 'rollout2' in {store_with_a_run} (did you mean 'rollout1'?); runs: ['rollout1']"
    )


def test_gc_and_verify_of_a_missing_store_create_nothing(tmp_path, capsys):
    for verb in ("gc", "verify"):
        assert main([verb, str(tmp_path / "typo")]) == 2
        assert f"no vinekv store at {tmp_path / 'typo'}" in _error(capsys)
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize(
    ("verb", "argv", "target", "after"),
    [
        ("train", [], "vinekv.train.run_training", "checkpoint at update 4 kept (x); continue with --resume"),
        ("rollout", ["S", "--run", "r", "--policy", "tiny"], "vinekv.rollout.sample_run", None),
        ("replay", ["KV", "--run", "rollout1", "--reward", "letters"], "vinekv.replay.replay_run", None),
    ],
)
def test_an_interrupt_ends_with_one_line_and_exit_130(
    store_with_a_run, tmp_path, capsys, monkeypatch, verb, argv, target, after
):
    from vinekv.cli import AFTER_INTERRUPT

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt(*([after] if after else []))

    monkeypatch.setattr(target, interrupted)
    argv = [str(store_with_a_run) if a == "KV" else str(tmp_path / "s") if a == "S" else a for a in argv]
    assert main([verb, *argv]) == INTERRUPTED
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"vinekv {verb}: interrupted; {after or AFTER_INTERRUPT[verb]}"
    if verb == "replay":  # what was stored before is intact
        with SnapshotStore.open(store_with_a_run, mode="r") as store:
            assert store.verify() == [] and store.trajectories("rollout1") == ["t0"]


def _runs(seeds_greedy: dict[str, list[float]]) -> list[dict]:
    return [
        {
            "method": method,
            "seed": seed,
            "curve": [
                {"updates": 0, "train_seconds": 0.0, "greedy": 0.4, "sampled": 0.3},
                {"updates": 2, "train_seconds": 10.0 + seed, "greedy": g, "sampled": g - 0.1},
            ],
            "step_seconds": [9.0, 4.0 + seed],
            "history": [],
        }
        for method, greedy in seeds_greedy.items()
        for seed, g in enumerate(greedy)
    ]


def test_compare_prints_a_table_with_intervals_not_nan():
    """Two seeds: GRPO ends at 0.5 and 0.6, VinePPO at 0.6 and 0.8. Paired gains 0.1, 0.2: mean
    0.150, sd 0.0707, t(0.975, 1) = 12.706, half-width 12.706 * 0.0707 / sqrt(2) = 0.635."""
    config = CompareConfig(methods=("off", "full"), seeds=2, updates=2, eval_every=2)
    table = format_comparison(config, _runs({"off": [0.5, 0.6], "full": [0.6, 0.8]}))
    rows = {line.split()[0]: line for line in table.splitlines() if line.split()[:1] in (["GRPO"], ["VinePPO"])}
    assert "0.400 -> 0.550 +- 0.635" in rows["GRPO"] and "0.400 -> 0.700 +- 1.271" in rows["VinePPO"]
    assert "+0.150 +- 0.635" in rows["VinePPO"] and "4.5 s" in rows["GRPO"]  # median of the batches after the first
    assert "reaches GRPO's peak 0.550" in table and "2 updates, 10 s" in rows["VinePPO"]
    assert "nan" not in table and "{" not in table
    one = format_comparison(
        CompareConfig(methods=("off",), seeds=1, updates=2, eval_every=2),
        [{**r, "step_seconds": [9.0]} for r in _runs({"off": [0.5]})],
    )
    assert "nan" not in one and "0.400 -> 0.500 " in one  # one seed: no interval; one batch: no median
    assert np.isclose(12.706 * np.std([0.1, 0.2], ddof=1) / np.sqrt(2), 0.635, atol=5e-4)


def test_the_compilation_cache_is_where_the_readme_says(tmp_path):
    """By default, EasyDeL's own cache folder (shared by every clone); a folder given by
    ``VINEKV_JAX_CACHE`` holds, before or after EasyDeL is imported (EasyDeL's kernels repointed
    JAX's cache to their folder whenever one was defined, replacing the one given)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, jax\n"
        "if sys.argv[1] == 'late': import easydel\n"
        "from vinekv.kvstore.process import enable_compilation_cache\n"
        "folder = enable_compilation_cache()\n"
        "import easydel\n"
        "from vinekv.models import build_model\n"
        "build_model('llama')\n"
        "import vinekv.replay.engines\n"
        "print(folder, jax.config.jax_compilation_cache_dir)\n"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("VINEKV_JAX_CACHE", "COMPILE_FUNC_DIR")}
    easydel_default = tmp_path / "home" / ".cache" / "ejkernel-cache" / "ejit_compiled_functions"
    for order, env, expected in (
        ("early", {**base, "HOME": str(tmp_path / "home")}, easydel_default),
        ("late", {**base, "VINEKV_JAX_CACHE": str(tmp_path / "mine")}, tmp_path / "mine"),
    ):
        argv = [sys.executable, "-c", script, order]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == [str(expected)] * 2, (order, expected)


def test_replay_settings_come_from_the_run_unless_given():
    from vinekv.replay.config import RolloutRecipe
    from vinekv.replay_defaults import replay_settings

    recipe = RolloutRecipe(40, temperature=0.7, top_k=5, stop_token_ids=(9,), policy="task", reward=None)
    none = dict.fromkeys(("horizon", "temperature", "top_p", "top_k", "sampler", "model", "reward"))
    settings, recorded = replay_settings(none, recipe, "r1")
    assert settings == {
        "horizon": 40,
        "temperature": 0.7,
        "top_p": 1.0,
        "top_k": 5,
        "sampler": "generate",
        "stop_token_ids": (9,),
        "model": "task",
        "reward": "letters",  # not recorded: the fallback
    }
    assert recorded == ["horizon", "temperature", "top_p", "top_k", "sampler", "stop_token_ids", "model"]
    given, _ = replay_settings({**none, "temperature": 0.7, "model": "task:runs/a"}, recipe, "r1")
    assert given["model"] == "task:runs/a" and given["temperature"] == 0.7  # agreeing, or a policy spec: taken
    with pytest.raises(ValueError, match=r"--top-k 0 contradicts run 'r1': .* top_k 5 \(recorded in the run\)"):
        replay_settings({**none, "top_k": 0}, recipe, "r1")
    fallback, recorded = replay_settings({**none, "horizon": 64}, None, "old")
    assert fallback["horizon"] == 64 and fallback["model"] == "tiny" and recorded == []
