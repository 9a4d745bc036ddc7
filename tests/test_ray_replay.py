"""Branch replay on Ray workers (one local Ray instance, 2 CPUs): any number of workers gives a
single process's values; a worker killed mid-replay loses no finished trajectory and its
unfinished one is valued again by the worker Ray restarts; a worker that always dies stops the
replay after max_retries; bad addresses and specs are clear errors."""

from __future__ import annotations

import collections
import json
import logging
import os
import warnings
from pathlib import Path

import pytest
import ray
from replay_kit import RUN, answer_reward, copies, mc_records, spill_run

from vinekv.cli import build_parser, main
from vinekv.kvstore import SnapshotStore
from vinekv.models import build_tokenizer
from vinekv.replay.branch_replay import ReplayConfig, replay_run
from vinekv.replay.ray_replay import ReplayWorkerError, replay_run_ray

TESTS = Path(__file__).resolve().parent
CONFIG = ReplayConfig(branches=4, max_tokens=6, seed=3, unfinished_reward=None)
CLI_CONFIG = ["--branches", "4", "--max-tokens", "6", "--seed", "3", "--unfinished-reward", "none"]
MODEL = "tiny:llama:0"  # the conftest's tiny_model, built again by each worker


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance whose workers import replay_kit and share the tests' JAX cache."""
    env = {"PYTHONPATH": str(TESTS), "VINEKV_JAX_CACHE": os.environ["COMPILE_FUNC_DIR"]}  # set by conftest
    with warnings.catch_warnings():  # the fork of Ray's process launches (followed by exec)
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": env},
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def stored(tiny_model, tmp_path_factory):
    """``(path, values)``: the stored run and its MC records from a plain in-process `replay_run`."""
    folder = tmp_path_factory.mktemp("ray_replay")
    spill_run(tiny_model, folder / "store")
    (single,) = copies(folder / "store", folder, "single")
    with SnapshotStore.open(single) as store:
        replay_run(store, RUN, tiny_model, build_tokenizer(), answer_reward, CONFIG, progress=False)
        return folder / "store", mc_records(store)


def _values(path: Path) -> dict:
    with SnapshotStore.open(path, mode="r") as store:
        return mc_records(store)


def test_one_or_two_workers_give_a_single_process_values(local_ray, stored, tmp_path, capsys):
    """One worker through the API (two ids per call), two through the CLI: the MC records of a
    single process."""
    path, expected = stored
    one, two = copies(path, tmp_path, "one", "two")
    report = replay_run_ray(
        one,
        RUN,
        MODEL,
        "replay_kit:answer_reward",
        CONFIG,
        num_workers=1,
        batch_size=2,
        metrics_path=tmp_path / "m.jsonl",
    )
    assert _values(one) == expected
    assert (report.trajectories, report.skipped, report.states, report.separate_branches) == (3, 0, 3 + 2 + 1, 4 * 6)
    assert report.branches == 4 * 5  # the first call's two trajectories share their prompt state
    assert (report.workers, report.retried) == (1, [])
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert sorted(x["trajectory"] for x in lines) == ["t0", "t1", "t2"]

    argv = ["replay", str(two), "--run", RUN, "--model", MODEL, "--reward", "replay_kit:answer_reward", *CLI_CONFIG]
    assert main([*argv, "--ray", "--workers", "2"]) == 0
    summary = capsys.readouterr().out
    assert "replayed 3 trajectories (0 already valued): 6 states, 24 branches" in summary
    assert "; 2 Ray workers," in summary
    assert _values(two) == expected


def test_a_killed_worker_loses_no_finished_trajectory(local_ray, stored, tmp_path, caplog):
    """`dying_reward` kills the first worker process to start its second trajectory: that
    trajectory is valued again by another process (Ray's restart of the worker), the one the
    dead process finished is not."""
    path, expected = stored
    (run,) = copies(path, tmp_path, "run")
    with SnapshotStore.open(run) as store:
        for tid in store.trajectories(RUN):
            store.annotate(RUN, tid, trajectory=tid)  # the reward sees which trajectory it scores
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    with caplog.at_level(logging.WARNING, logger="vinekv.replay.ray_replay"):
        report = replay_run_ray(
            run, RUN, MODEL, "replay_kit:dying_reward", CONFIG, progress=False, worker_env={"VINEKV_HOOKS": str(hooks)}
        )
    assert _values(run) == expected
    calls = [line.split() for line in (hooks / "calls").read_text().splitlines()]  # [pid, trajectory]
    count = collections.Counter(tid for _, tid in calls)
    (killed,) = [tid for tid, n in count.items() if n == 2]
    assert sorted(count.values()) == [1, 1, 2]
    dead, again = [pid for pid, tid in calls if tid == killed]
    assert dead != again  # valued by another worker
    (finished,) = [tid for pid, tid in calls if pid == dead and tid != killed]
    assert count[finished] == 1  # what the dead worker had finished is not valued again
    assert (report.trajectories, report.skipped, report.retried, report.workers) == (3, 0, [killed], 3)
    (warning,) = [r.getMessage() for r in caplog.records if "died while valuing" in r.getMessage()]
    assert f"(pid {dead})" in warning and f"['{killed}']" in warning


def test_clear_errors(local_ray, stored, capsys):
    path, _ = stored
    with pytest.raises(ConnectionError, match="no Ray cluster at '127.0.0.1:1'"):
        replay_run_ray(path, RUN, MODEL, "letters", address="127.0.0.1:1")
    with pytest.raises(ReplayWorkerError, match=r"could not start .* no module named 'no_such_module' \(is it on PY"):
        replay_run_ray(path, RUN, MODEL, "no_such_module:reward", num_workers=1, progress=False)
    with pytest.raises(ValueError, match="num_workers must be an int >= 1, got 0"):
        replay_run_ray(path, RUN, MODEL, "letters", num_workers=0)

    assert main(["replay", str(path), "--run", RUN, "--ray", "127.0.0.1:1"]) == 2
    assert "no Ray cluster at '127.0.0.1:1'" in capsys.readouterr().err
    assert main(["replay", str(path), "--run", RUN, "--workers", "2"]) == 2
    assert "--workers and --worker-gpus need --ray" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["replay", str(path), "--run", RUN, "--ray", "--shard", "0/2"])
    assert "not allowed with argument --ray" in capsys.readouterr().err


def test_a_call_whose_worker_always_dies_stops_after_max_retries(local_ray, stored, tmp_path):
    """Ray restarts the worker and runs its call again ``max_retries`` times, then the replay
    stops naming the trajectories; nothing is written."""
    path, _ = stored
    (run,) = copies(path, tmp_path, "run")
    with pytest.raises(ReplayWorkerError, match=r"trajectories \['t0'\]: their worker died 2 times \(max_retries=1\)"):
        replay_run_ray(
            run, RUN, MODEL, "replay_kit:always_dying_reward", CONFIG, num_workers=1, max_retries=1, progress=False
        )
    with SnapshotStore.open(run, mode="r") as store:
        assert not any("mc" in store.trajectory_info(RUN, tid)["fields"] for tid in store.trajectories(RUN))
