"""The `vinekv` verbs on the arithmetic task, as a user chains them: rollout -> replay -> offline
train, and compare; each on a short warm-up so they stay quick."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vinekv.cli import main

SHORT_WARMUP = {"steps": 20, "train_problems": 256, "warmup_steps": 5}


def short_policy():
    """``(model, tokenizer)`` of the short warm-up (`--policy test_cli_task:short_policy`)."""
    from vinekv.tasks.warmup import WarmupConfig, warm_up

    warmed = warm_up(WarmupConfig(**SHORT_WARMUP), progress=False)
    return warmed.model, warmed.tokenizer


@pytest.fixture
def short_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VINEKV_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_rollout_replay_then_offline_training(short_cache, capsys):
    from vinekv.kvstore import SnapshotStore
    from vinekv.replay import MCRecord
    from vinekv.tasks.arithmetic import make_dataset, reward

    tmp_path, store = short_cache, str(short_cache / "kv")
    policy = "test_cli_task:short_policy"
    assert main(["rollout", store, "--run", "r1", "--policy", policy, "--problems", "2", "--group", "2"]) == 0
    assert "4 trajectories (2 prompts x 2)" in capsys.readouterr().out
    model, tokenizer = short_policy()
    problems = make_dataset(2, seed=1)  # vinekv train --seed 0 trains on these, in this order
    with SnapshotStore.open(store, mode="r") as reader:
        assert reader.trajectories("r1") == ["000000", "000001", "000002", "000003"]
        for row, tid in enumerate(reader.trajectories("r1")):
            info = reader.trajectory_info("r1", tid)
            prompt = tokenizer.decode(reader.token_ids("r1", tid)[: info["prompt_len"]])
            text = tokenizer.decode(info["response_token_ids"], skip_special_tokens=True)
            assert prompt == problems[row // 2]["prompt"] and info["fields"]["answer"] == problems[row // 2]["answer"]
            assert info["fields"]["vinekv_reward"] == reward([prompt], [text], [info["fields"]["answer"]])[0]
            assert info["fields"]["vinekv_group"] == row // 2
    assert main(["rollout", store, "--run", "r1", "--policy", policy]) == 2
    assert "already exists" in capsys.readouterr().err

    with SnapshotStore.open(store, mode="r") as reader:  # how the rollouts were sampled, for replay
        assert reader.run_fields("r1")["vinekv_rollout"] == {
            "horizon": 40,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "sampler": "generate",
            "stop_token_ids": [],
            "policy": policy,
            "reward": "task",
        }
    replay = ["replay", store, "--run", "r1", "--branches", "2"]
    assert main([*replay, "--horizon", "64"]) == 2  # contradicts the record: refused before any model loads
    assert "--horizon 64 contradicts run 'r1': its rollouts were sampled with horizon 40" in capsys.readouterr().err
    assert main([*replay, "--max-tokens", "40"]) == 0  # policy, reward, horizon and sampling from the run
    out = capsys.readouterr().out
    recorded = "horizon 40, temperature 1.0, top_p 1.0, top_k 0, sampler generate"
    assert f"from the run's rollout recipe: {recorded}, model {policy}, reward task" in out
    assert "replayed 4 trajectories" in out
    with SnapshotStore.open(store, mode="r") as reader:
        infos = [reader.trajectory_info("r1", t) for t in reader.trajectories("r1")]
    records = [MCRecord.from_fields(info["fields"]["mc"]) for info in infos]
    assert all(r.returns and all(len(x) == 2 for x in r.returns) for r in records)  # K = 2 at every state

    config = tmp_path / "train.toml"
    config.write_text(
        f'output = "{tmp_path / "out"}"\neval_problems = 4\ntrain_problems = 64\nplot = false\n'
        f"[warmup]\n{''.join(f'{k} = {v}{chr(10)}' for k, v in SHORT_WARMUP.items())}"
        "[trainer]\nmax_training_steps = 2\ntotal_batch_size = 2\nnum_return_sequences = 2\n"
    )
    assert main(["train", "--config", str(config), "--offline-store", store]) == 2
    assert "--offline-store needs --offline-run" in capsys.readouterr().err
    offline = ["train", "--config", str(config), "--offline-run", "r1", "--offline-store", store]
    assert main(offline) == 0
    out = capsys.readouterr().out
    with SnapshotStore.open(store, mode="r") as reader:
        rewards = [reader.trajectory_info("r1", t)["fields"]["vinekv_reward"] for t in reader.trajectories("r1")]
    step = next(line for line in out.splitlines() if line.split()[:1] == ["2"])
    assert float(step.split()[1]) == pytest.approx(np.mean(rewards), abs=1e-3)  # the stored rollouts' rewards
    assert step.split()[5] == "0"  # branches: none sampled, the values came from the store
    assert "checkpoint:" in out and "run-2" in out
    files = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*"))
    assert main([*offline, "--resume"]) == 0  # the checkpoint is at --steps already: a no-op that says so
    assert "nothing to do: the checkpoint" in capsys.readouterr().out
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*")) == files  # nothing changed


def test_compare_runs_every_method_from_one_warm_up(short_cache, capsys):
    tmp_path = short_cache
    config = tmp_path / "compare.toml"
    config.write_text(
        "eval_problems = 4\ntrain_problems = 32\n"
        f"[warmup]\n{''.join(f'{k} = {v}{chr(10)}' for k, v in SHORT_WARMUP.items())}"
        "[trainer]\ntotal_batch_size = 2\nvineppo_branches = 2\nvineppo_ppo_epochs = 1\n"
    )
    args = ["compare", "--config", str(config), "--methods", "off,ppo,full", "--seeds", "1", "--updates", "2"]
    assert main([*args, "--eval-every", "1", "--output", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()
        for line in out.splitlines()
        if line.split()[:1] in (["GRPO"], ["PPO"], ["VinePPO"])
    }
    assert set(rows) == {"GRPO", "PPO", "VinePPO"} and all(
        row[1:3] == ["1", "2"] for row in rows.values()
    )  # seeds, updates
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [(r["method"], [c["updates"] for c in r["curve"]]) for r in saved["results"]] == [
        ("off", [0, 1, 2]),
        ("ppo", [0, 1, 2]),
        ("full", [0, 1, 2]),
    ]
    before = {r["method"]: r["curve"][0]["greedy"] for r in saved["results"]}
    assert before["off"] == before["ppo"] == before["full"]  # one warm-up (PPO: under a value head), one held-out set
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert main(["compare", "--methods", "off,sft"]) == 2
    assert "subset of" in capsys.readouterr().err
