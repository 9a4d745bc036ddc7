"""The store's reliability campaign: kill sweeps, a corruption oracle and a fuzzer.

Importable without pytest: tests/test_campaign.py runs a short version in CI, and

    python tests/reliability_campaign.py --kills 60 --mutations 4 --fuzz-examples 500 --out summary.json

runs the long one whose figures are in docs/reliability.md.

- `kill_sweep`: a worker process (tests/_campaign_worker.py) spills, annotates (a resumed
  replay), deletes a run or creates a store and is SIGKILLed after a random delay; then every
  trajectory it announced is checked bit for bit (lossless) or against encode -> decode (int8),
  nothing partial may be visible, the next writer's open must leave no leftovers, and the
  operation, resumed to the end, must give the values an uninterrupted run gives.
- `corruption_sweep`: every file of small stores (lossless, int8, int4) gets byte flips, digit
  edits (JSON), truncations and is deleted, one mutation at a time; a fresh reader then reads
  everything. Each read must raise a `StoreError` or return exactly the truth.
- `door_sweep`: bad input spilled (token ids outside the vocabulary, NaN/Inf KV; host states and
  host-encoded codes, three codecs, both durabilities) among good spills: each is refused with
  a ValueError naming it, nothing of it is stored, the good spills read back exactly.
- `exit_sweep`: worker processes spill and exit without `close()` (end of script, `sys.exit`,
  an uncaught exception, the store dropped): exit code as expected, the warning names the
  spills since the last flush, every spill committed; a thread still spilling while the exit
  closes the store: each spill that returned committed, the next refused; a thread opening a
  store after the exit hook: refused, nothing created; `os._exit` is reported apart (not promised).
- `fuzz`: hypothesis drives malformed and re-sealed metadata, absurd shapes, hostile ids and
  open arguments through the store, in a child process under an address-space limit; allowed
  are clear errors only, nothing may be written outside the store.

Every function returns a JSON-able dict of counts plus ``violations`` / ``findings`` lists.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
for _p in (str(REPO), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _campaign_worker import (  # noqa: E402
    CHUNK_TOKENS,
    FINGERPRINT,
    LAYOUT,
    campaign_fields,
    campaign_state,
    expected_kv,
    length,
    mc_value,
    prompt_len,
)

from vinekv.kvstore import CachedState, EncodedState, SnapshotStore  # noqa: E402
from vinekv.kvstore.codecs import get_codec  # noqa: E402
from vinekv.kvstore.errors import IntegrityError, MissingEntryError, StoreError, StoreFormatError  # noqa: E402
from vinekv.kvstore.integrity import json_digest, seal  # noqa: E402

WORKER = TESTS / "_campaign_worker.py"
WORKER_TIMEOUT = 180.0
OPERATIONS = ("spill", "annotate", "delete", "create")
SPILL_CONFIGS = (("lossless", "trajectory"), ("int8", "flush"), ("int8", "trajectory"), ("lossless", "flush"))
SPILL_COUNT = 40
FLUSH_GROUP = 3
ANNOTATE_COUNT = 24
DELETE_COUNT = 40
FILE_KINDS = (
    "root",
    "runs",
    "run",
    "group",
    "prompt_node",
    "trajectory_node",
    "array_meta",
    "shard",
)
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def tid_of(n: int) -> str:
    return f"t{n:03d}"


def n_of(tid: str) -> int:
    return int(tid[1:])


# -- workers -------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "TF_CPP_MIN_LOG_LEVEL": "3"}


class _Worker:
    """One `_campaign_worker` process; its announcements are collected line by line."""

    def __init__(self, op: str, args: dict[str, Any], stdin: bool = False):
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), op, json.dumps(args)],
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=REPO,
        )
        self.lines: list[str] = []
        self.times: dict[str, float] = {}
        self.stderr = ""
        self._guard = threading.Timer(WORKER_TIMEOUT, self.proc.kill)  # a hung worker fails the sweep
        self._guard.daemon = True
        self._guard.start()

    def send(self, text: str) -> None:
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def wait_for(self, word: str) -> None:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self._collect()
                raise RuntimeError(f"worker exited (rc {self.proc.returncode}) before {word!r}: {self.stderr[-3000:]}")
            self.lines.append(line.strip())
            self.times[line.strip()] = time.monotonic()
            if line.strip() == word:
                return

    def kill_after(self, delay: float) -> bool:
        """SIGKILLs the worker ``delay`` s from now; True if it was killed before it finished."""
        time.sleep(delay)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self._collect()
        return self.proc.returncode == -signal.SIGKILL and "done" not in self.lines

    def finish(self) -> list[str]:
        self._collect()
        if self.proc.returncode != 0:
            raise RuntimeError(f"worker failed (rc {self.proc.returncode}): {self.stderr[-3000:]}")
        return self.lines

    def _collect(self) -> None:
        out, self.stderr = self.proc.communicate()
        self._guard.cancel()
        self.lines += [line.strip() for line in out.splitlines()]


def _run_worker(op: str, args: dict[str, Any]) -> list[str]:
    return _Worker(op, args).finish()


# -- inspecting a store --------------------------------------------------------------------
def _in_flight(path: Path) -> list[str]:
    """What a killed writer left in flight: non-empty staging folders (uncommitted nodes, a
    deletion under way) and temporary files."""
    staging = path / ".staging"
    found = []
    if staging.is_dir():
        found += [str(p.relative_to(path)) for p in staging.iterdir() if p.is_dir() and any(p.iterdir())]
    return found + _temporary_files(path)


def _temporary_files(path: Path) -> list[str]:
    if not path.is_dir():
        return []
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.name.endswith(".tmp") or "__lock" in p.name)


def _leftovers(path: Path) -> list[str]:
    """Anything a writer's open and close should have removed: staging entries other than the
    lock files, temporary files anywhere."""
    staging = path / ".staging"
    found = []
    if staging.is_dir():
        found += [str(p.relative_to(path)) for p in staging.iterdir() if p.name not in ("zarr.json", "meta.lock")]
    return sorted(set(found + _temporary_files(path)))


def _leftover_problems(path: Path) -> list[str]:
    return [f"left over after the next open: {rel}" for rel in _leftovers(path)]


def _split(problems: list[str], where: str) -> list[str]:
    """The problems, prefixed with ``where``."""
    return [f"{where}: {p}" for p in problems]


def _reported(default: Callable[[list[str]], Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A check that raises reports the exception as a problem (``default(problems)``) instead
    of ending the sweep."""

    def wrap(check: Callable[..., Any]) -> Callable[..., Any]:
        def checked(*args: Any) -> Any:
            try:
                return check(*args)
            except Exception as err:  # a store error after a kill is a violation, not a crash
                return default([f"{check.__name__} raised {type(err).__name__}: {err}"])

        checked.__name__ = check.__name__
        return checked

    return wrap


def _problems(problems: list[str]) -> list[str]:
    return problems


def _check_trajectory(store: SnapshotStore, run: str, tid: str, codec: str, fields: dict[str, Any]) -> list[str]:
    """Problems of one visible trajectory: fields, tokens, KV (full and a prefix) vs the truth."""
    n = n_of(tid)
    problems = []
    info = store.trajectory_info(run, tid)
    if info["fields"] != fields:
        problems.append(f"{run}/{tid}: fields {info['fields']} != {fields}")
    if (info["length"], info["prompt_len"]) != (length(n), prompt_len(n)):
        problems.append(f"{run}/{tid}: length/prompt_len {(info['length'], info['prompt_len'])}")
    ids = campaign_state(n).token_ids[0]
    if store.token_ids(run, tid) != ids.tolist():
        problems.append(f"{run}/{tid}: token ids differ")
    kv = expected_kv(n, codec)
    for t in (prompt_len(n) + 1, length(n)):
        state = store.read_prefix(run, tid, t)
        got = np.stack([state.keys[:, 0], state.values[:, 0]], axis=1)
        if got.dtype != kv.dtype or got.tobytes() != kv[:, :, :t].tobytes():
            problems.append(f"{run}/{tid}: KV of prefix {t} differs from the truth ({codec})")
        if state.token_ids[0].tobytes() != ids[:t].tobytes():
            problems.append(f"{run}/{tid}: token ids of prefix {t} differ")
    return problems


_checked_trajectory = _reported(_problems)(_check_trajectory)  # an error reading it is a problem too


def _reopen_for_writing(path: Path) -> list[str]:
    """Opens and closes the store for writing (which sweeps a crashed writer's remains);
    returns a problem per leftover."""
    SnapshotStore.open(path, mode="r+").close()
    return _leftover_problems(path)


# -- kill sweeps ---------------------------------------------------------------------------
def kill_sweep(operation: str, kills: int, workdir: str | Path, seed: int = 0, log: Log = _quiet) -> dict[str, Any]:
    """SIGKILLs ``kills`` runs of ``operation`` (spill, annotate, delete, create) at random
    points and checks the store after each. Returns counts and ``violations`` (empty: pass)."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
    workdir = Path(workdir) / f"kill-{operation}"
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-{operation}")
    start = time.monotonic()
    sweep = {"spill": _sweep_spill, "annotate": _sweep_annotate, "delete": _sweep_delete, "create": _sweep_create}
    result = sweep[operation](kills, workdir, rng, log)
    result.update(operation=operation, seconds=round(time.monotonic() - start, 1))
    log(
        f"[kill {operation}] {result['kills']} kills, {result['mid_write']} mid-write, "
        f"{len(result['violations'])} violations, {result['seconds']} s"
    )
    return result


def _sweep_spill(kills: int, workdir: Path, rng: random.Random, log: Log) -> dict[str, Any]:
    stats: Counter[str] = Counter()
    violations: list[str] = []
    episode = 0
    while stats["kills"] < kills and episode < 4 * kills + 4:
        codec, durability = SPILL_CONFIGS[episode % len(SPILL_CONFIGS)]
        path = workdir / f"e{episode}-{codec}-{durability}"
        args = {"path": str(path), "codec": codec, "durability": durability, "run": "r", "count": SPILL_COUNT}
        args["group"] = FLUSH_GROUP if durability == "flush" else 1
        announced: set[int] = set()  # commits announced by this episode's workers
        for _ in range(3):  # kills per episode, each resuming the last
            if stats["kills"] >= kills:
                break
            worker = _Worker("spill", args)
            worker.wait_for("ready")
            if not worker.kill_after(rng.uniform(0.0, 0.4 if durability == "trajectory" else 0.2)):
                stats["finished_before_kill"] += 1
                break
            stats["kills"] += 1
            stats[f"kills_{codec}_{durability}"] += 1
            in_flight = _in_flight(path)
            stats["mid_write"] += bool(in_flight)
            announced |= {int(line.split()[1]) for line in worker.lines if line.startswith("committed ")}
            where = f"spill kill {stats['kills']} ({codec}, {durability}, episode {episode})"
            violations += _split(_verify_spill(path, codec, announced, stats), where)
        worker = _Worker("spill", args)  # resumed to the end
        worker.finish()
        with SnapshotStore.open(path, mode="r") as store:
            ids = store.trajectories("r")
            if ids != [tid_of(n) for n in range(SPILL_COUNT)]:
                violations.append(f"spill episode {episode}: resumed run holds {ids}")
            for tid in ids:
                violations += _check_trajectory(store, "r", tid, codec, campaign_fields(n_of(tid)))
        stats["episodes"] += 1
        episode += 1
    return {**stats, "violations": violations}


@_reported(_problems)
def _verify_spill(path: Path, codec: str, announced: set[int], stats: Counter[str]) -> list[str]:
    problems = []
    if not (path / "zarr.json").exists():
        return ["the store's root metadata is missing after the kill"]
    with SnapshotStore.open(path, mode="r") as store:
        ids = store.trajectories("r") if "r" in store.runs() else []
        visible = {n_of(tid) for tid in ids}
        if announced - visible:
            problems.append(f"committed trajectories lost: {sorted(announced - visible)}")
        if sorted(visible) != list(range(len(visible))):
            problems.append(f"visible trajectories are not the first ones spilled: {sorted(visible)}")
        stats["visible_unannounced"] += len(visible - announced)
        stats["trajectories_checked"] += len(ids)
        for tid in ids:
            problems += _check_trajectory(store, "r", tid, codec, campaign_fields(n_of(tid)))
        if ids:
            store.size("r")  # reads every prompt node of the run
    problems += _reopen_for_writing(path)
    return problems


def _build_store(path: Path, codec: str, runs: dict[str, Iterable[int]], durability: str = "trajectory") -> Path:
    with SnapshotStore.open(path, codec=codec, chunk_tokens=CHUNK_TOKENS, durability=durability) as store:
        for run, ns in runs.items():
            for n in ns:
                store.spill(run, tid_of(n), campaign_state(n), prompt_len(n), **campaign_fields(n))
    return path


def _sweep_annotate(kills: int, workdir: Path, rng: random.Random, log: Log) -> dict[str, Any]:
    stats: Counter[str] = Counter()
    violations: list[str] = []
    codecs = ("int8", "lossless")
    pristine = {c: _build_store(workdir / f"pristine-{c}", c, {"r": range(ANNOTATE_COUNT)}) for c in codecs}
    expected = {
        c: {tid_of(n): mc_value(tid_of(n), expected_kv(n, c), prompt_len(n)) for n in range(ANNOTATE_COUNT)}
        for c in codecs
    }
    reference = {}  # an uninterrupted replay's fields
    for c in codecs:
        shutil.copytree(pristine[c], workdir / f"reference-{c}")
        _run_worker("annotate", {"path": str(workdir / f"reference-{c}"), "run": "r"})
        with SnapshotStore.open(workdir / f"reference-{c}", mode="r") as store:
            reference[c] = {tid: store.trajectory_info("r", tid)["fields"] for tid in store.trajectories("r")}
            for tid, fields in reference[c].items():
                if fields != {**campaign_fields(n_of(tid)), "mc_test": expected[c][tid]}:
                    violations.append(f"annotate reference ({c}): {tid} has {fields}")
    episode = 0
    while stats["kills"] < kills and episode < 4 * kills + 4:
        codec = codecs[episode % len(codecs)]
        path = workdir / f"e{episode}-{codec}"
        shutil.copytree(pristine[codec], path)
        for _ in range(3):
            if stats["kills"] >= kills:
                break
            worker = _Worker("annotate", {"path": str(path), "run": "r"})
            worker.wait_for("ready")
            if not worker.kill_after(rng.uniform(0.0, 0.15)):
                stats["finished_before_kill"] += 1
                break
            stats["kills"] += 1
            announced = {line.split()[1] for line in worker.lines if line.startswith("annotated ")}
            stats["temporary_files_at_kill"] += bool(_temporary_files(path))
            where = f"annotate kill {stats['kills']} ({codec}, episode {episode})"
            problems, annotated = _verify_annotate(path, codec, announced, expected[codec])
            violations += _split(problems, where)
            stats["mid_write"] += 0 < annotated < ANNOTATE_COUNT
            stats["annotations_checked"] += annotated
        _run_worker("annotate", {"path": str(path), "run": "r"})  # the replay resumed to the end
        with SnapshotStore.open(path, mode="r") as store:
            final = {tid: store.trajectory_info("r", tid)["fields"] for tid in store.trajectories("r")}
        if final == reference[codec]:
            stats["resumed_identical"] += 1
        else:
            violations.append(f"annotate episode {episode}: resumed fields differ from an uninterrupted replay's")
        episode += 1
    stats["episodes"] = episode
    return {**stats, "violations": violations}


@_reported(lambda problems: (problems, 0))
def _verify_annotate(path: Path, codec: str, announced: set[str], expected: dict[str, Any]) -> tuple[list[str], int]:
    problems = []
    annotated = 0
    with SnapshotStore.open(path, mode="r") as store:
        ids = store.trajectories("r")
        if ids != [tid_of(n) for n in range(ANNOTATE_COUNT)]:
            problems.append(f"trajectories changed: {ids}")
        for tid in ids:
            fields = store.trajectory_info("r", tid)["fields"]  # digest checked
            base = campaign_fields(n_of(tid))
            if "mc_test" in fields:
                annotated += 1
                base = {**base, "mc_test": expected[tid]}
            elif tid in announced:
                problems.append(f"announced annotation of {tid} is missing")
            problems += _check_trajectory(store, "r", tid, codec, base)
    problems += _reopen_for_writing(path)
    return problems, annotated


def _sweep_delete(kills: int, workdir: Path, rng: random.Random, log: Log) -> dict[str, Any]:
    stats: Counter[str] = Counter()
    violations: list[str] = []
    pristine = _build_store(workdir / "pristine", "int8", {"big": range(DELETE_COUNT), "keep": range(2)})
    durations = []
    for i in range(3):  # how long an uninterrupted delete_run takes (the kill window)
        path = workdir / f"calibrate{i}"
        shutil.copytree(pristine, path)
        worker = _Worker("delete", {"path": str(path), "run": "big"})
        worker.wait_for("ready")
        worker.wait_for("deleted")
        worker.finish()
        durations.append(worker.times["deleted"] - worker.times["ready"])
    window = 1.1 * sorted(durations)[1]
    stats["window_ms"] = round(1000 * window)
    attempt = 0
    while stats["kills"] < kills and attempt < 4 * kills + 4:
        path = workdir / f"k{attempt}"
        attempt += 1
        shutil.copytree(pristine, path)
        worker = _Worker("delete", {"path": str(path), "run": "big"})
        worker.wait_for("ready")
        delay = 0.0 if rng.random() < 0.2 else rng.uniform(0.0, window)  # 0: before the run is renamed away
        if not worker.kill_after(delay):
            stats["finished_before_kill"] += 1
            shutil.rmtree(path)
            continue
        stats["kills"] += 1
        where = f"delete kill {stats['kills']}"
        intact = (path / "runs/big/zarr.json").exists()
        in_flight = _in_flight(path)
        phase = "run_intact" if intact else ("mid_removal" if in_flight else "run_gone")
        stats[phase] += 1
        stats["mid_write"] += phase == "mid_removal" or (intact and bool(in_flight))
        violations += _split(_verify_delete(path, intact), f"{where} ({phase})")
        shutil.rmtree(path)
    return {**stats, "violations": violations}


@_reported(_problems)
def _verify_delete(path: Path, intact: bool) -> list[str]:
    problems = []
    with SnapshotStore.open(path, mode="r") as store:
        runs = store.runs()
        if runs != (["big", "keep"] if intact else ["keep"]):
            problems.append(f"runs {runs} (run folder {'present' if intact else 'gone'})")
        for tid in store.trajectories("keep"):
            problems += _check_trajectory(store, "keep", tid, "int8", campaign_fields(n_of(tid)))
        if "big" in runs:
            ids = store.trajectories("big")
            if ids != [tid_of(n) for n in range(DELETE_COUNT)]:
                problems.append(f"a run not deleted is not whole: {len(ids)} of {DELETE_COUNT} trajectories")
            for tid in ids:
                problems += _check_trajectory(store, "big", tid, "int8", campaign_fields(n_of(tid)))
        else:
            try:
                store.trajectory_info("big", tid_of(0))
                problems.append("a deleted run's trajectory is still readable")
            except MissingEntryError:
                pass
    with SnapshotStore.open(path, mode="r+", codec="int8") as store:  # sweeps the remains
        problems += _leftover_problems(path)
        if "big" in store.runs():
            store.delete_run("big")  # the deletion, resumed
        # the same run name again, one id reused with other data: no old trajectory may show
        for n, tid in ((100, tid_of(0)), (101, "new")):
            state = campaign_state(n)
            store.spill("big", tid, state, prompt_len(n), **campaign_fields(n))
        store.flush()
        if store.trajectories("big") != ["new", tid_of(0)]:
            problems.append(f"the run spilled again holds {store.trajectories('big')}")
        for n, tid in ((100, tid_of(0)), (101, "new")):
            got = store.read_prefix("big", tid, length(n))
            kv = np.stack([got.keys[:, 0], got.values[:, 0]], axis=1)
            if kv.tobytes() != expected_kv(n, "int8").tobytes():
                problems.append(f"the run spilled again reads other KV for {tid}")
            if store.trajectory_info("big", tid)["fields"] != campaign_fields(n):
                problems.append(f"the run spilled again has old fields for {tid}")
    return problems


def _create_state(path: Path) -> str:
    if not path.exists():
        return "nothing"
    if (path / "zarr.json").exists():
        return "complete"
    return "partial" if any(path.rglob("*")) else "empty_dir"


def _sweep_create(kills: int, workdir: Path, rng: random.Random, log: Log) -> dict[str, Any]:
    stats: Counter[str] = Counter()
    violations: list[str] = []
    durations = []
    for i in range(3):
        worker = _Worker("create", {"path": str(workdir / f"calibrate{i}"), "codec": "int8"})
        worker.wait_for("begin")
        worker.wait_for("created int8")
        worker.finish()
        durations.append(worker.times["created int8"] - worker.times["begin"])
    window = 1.3 * max(durations)
    stats["window_ms"] = round(1000 * window)
    attempt = 0
    while stats["kills"] < kills and attempt < 4 * kills + 4:
        path = workdir / f"k{attempt}" / "store"
        attempt += 1
        codec = ("int8", "lossless")[attempt % 2]
        worker = _Worker("create", {"path": str(path), "codec": codec})
        worker.wait_for("begin")
        if not worker.kill_after(rng.uniform(0.0, window)):
            stats["finished_before_kill"] += 1
            continue
        stats["kills"] += 1
        state = _create_state(path)
        stats[state] += 1
        stats["mid_write"] += state == "partial" or (state == "complete" and bool(_in_flight(path)))
        where = f"create kill {stats['kills']} ({state})"
        violations += _split(_verify_create(path, state, codec), where)
    races = max(2, kills // 5)
    for i in range(races):
        mode = ("a", "w-")[i % 2]
        problems = _race_creators(workdir / f"race{i}" / "store", mode)
        stats[f"races_{mode}"] += 1
        violations += _split(problems, f"creation race {i} (mode {mode!r})")
    return {**stats, "violations": violations}


@_reported(_problems)
def _verify_create(path: Path, state: str, codec: str) -> list[str]:
    problems = []
    try:
        with SnapshotStore.open(path, mode="r") as store:
            if state != "complete":
                problems.append("mode 'r' opened a store whose creation did not finish")
            elif store.runs() != []:
                problems.append(f"a new store has runs {store.runs()}")
    except StoreFormatError:
        if state == "complete":
            problems.append("a created store does not open with mode 'r'")
    problems += _check_usable(path, codec)
    return problems


def _check_usable(path: Path, codec: str) -> list[str]:
    """open(mode='a') works: a trajectory spills and reads back; nothing is left over."""
    problems = []
    with SnapshotStore.open(path, mode="a", codec=codec) as store:
        store.spill("r", tid_of(0), campaign_state(0), prompt_len(0), **campaign_fields(0))
        store.flush()
        problems += _check_trajectory(store, "r", tid_of(0), store.codec.name, campaign_fields(0))
    return problems + _leftover_problems(path)


@_reported(_problems)
def _race_creators(path: Path, mode: str) -> list[str]:
    workers = [
        _Worker("create", {"path": str(path), "codec": codec, "mode": mode, "wait": True}, stdin=True)
        for codec in ("int8", "lossless")
    ]
    for worker in workers:
        worker.send("go\n")
    lines = sorted(next((x for x in w.finish() if x.startswith(("created", "exists"))), "?") for w in workers)
    problems = []
    with SnapshotStore.open(path, mode="r") as store:
        winner = store.codec.name
    want = [f"created {winner}"] * 2 if mode == "a" else [f"created {winner}", "exists"]
    if lines != want:
        problems.append(f"creators said {lines}, expected {want}")
    return problems + _check_usable(path, winner)


# -- corruption oracle ---------------------------------------------------------------------
CORRUPT_RUNS = {"r": (0, 1, 2, 3), "q": (4,)}  # r: prompts 0, 1, 2 (t000 and t003 share one)
ANNOTATED = ("r", tid_of(0), {"mc": {"mean": [0.5, 1.5], "count": [2, 2]}})


def _prefixes(n: int) -> list[int]:
    return sorted({1, prompt_len(n), prompt_len(n) + 1, min(prompt_len(n) + CHUNK_TOKENS, length(n)), length(n)})


def _digest(a: np.ndarray) -> str:
    return (
        f"{a.dtype.str}{list(a.shape)}:{hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()}"
    )


def _info_view(info: dict[str, Any]) -> dict[str, Any]:
    keys = ("fields", "prompt_len", "length", "response_token_ids", "fingerprint", "layout", "codec")
    return {k: info.get(k) for k in keys}


def _kv_view(state: Any) -> tuple[Any, ...]:
    return (_digest(state.keys), _digest(state.values), _digest(state.token_ids), state.fingerprint)


def _truth(codec: str) -> dict[str, Any]:
    """What every read of the corruption store must return, from the synthetic data alone."""
    spec = get_codec(codec).spec()
    truth: dict[str, Any] = {"open": None, "runs": sorted(CORRUPT_RUNS)}
    for run, ns in CORRUPT_RUNS.items():
        truth[f"trajectories:{run}"] = [tid_of(n) for n in ns]
        for n in ns:
            tid, state = tid_of(n), campaign_state(n)
            fields = campaign_fields(n)
            if (run, tid) == ANNOTATED[:2]:
                fields = {**fields, **ANNOTATED[2]}
            ids = state.token_ids[0]
            truth[f"info:{run}/{tid}"] = {
                "fields": fields,
                "prompt_len": prompt_len(n),
                "length": length(n),
                "response_token_ids": ids[prompt_len(n) :].tolist(),
                "fingerprint": FINGERPRINT,
                "layout": LAYOUT.to_dict(),
                "codec": spec,
            }
            truth[f"tokens:{run}/{tid}"] = ids.tolist()
            kv = expected_kv(n, codec)
            for t in _prefixes(n):
                truth[f"kv:{run}/{tid}@{t}"] = (
                    _digest(kv[:, 0, :t][:, None]),
                    _digest(kv[:, 1, :t][:, None]),
                    _digest(ids[None, :t]),
                    FINGERPRINT,
                )
    return truth


def _observe(path: Path) -> dict[str, tuple[str, Any]]:
    """Every read of the truth's plan by a fresh reader: name -> ("ok", value) or ("error", exc)."""
    out: dict[str, tuple[str, Any]] = {}

    def attempt(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            value = fn(*args)
        except Exception as err:  # judged by the caller: StoreError or not
            out[name] = ("error", err)
            return None
        out[name] = ("ok", value)
        return value

    store = attempt("open", SnapshotStore.open, path, "r")
    if store is None:
        return out
    out["open"] = ("ok", None)
    with store:
        attempt("runs", store.runs)
        for run, ns in CORRUPT_RUNS.items():
            attempt(f"trajectories:{run}", store.trajectories, run)
            for n in ns:
                tid = tid_of(n)
                attempt(f"info:{run}/{tid}", lambda r, t: _info_view(store.trajectory_info(r, t)), run, tid)
                attempt(f"tokens:{run}/{tid}", store.token_ids, run, tid)
                for t in _prefixes(n):
                    attempt(f"kv:{run}/{tid}@{t}", lambda r, i, p: _kv_view(store.read_prefix(r, i, p)), run, tid, t)
    return out


def _judge(obs: dict[str, tuple[str, Any]], truth: dict[str, Any]) -> dict[str, list[str]]:
    verdict: dict[str, list[str]] = {"wrong": [], "detected": [], "crash": []}
    for name, expected in truth.items():
        if name not in obs:
            continue  # not attempted: the store refused to open
        status, value = obs[name]
        if status == "ok":
            if value != expected:
                verdict["wrong"].append(name)
        elif isinstance(value, StoreError):
            verdict["detected"].append(name)
        else:
            verdict["crash"].append(f"{name}: {type(value).__name__}: {str(value)[:200]}")
    return verdict


def classify(rel: str) -> str:
    """The kind of a store file (its path relative to the store root)."""
    parts = rel.split("/")
    if rel == "zarr.json":
        return "root"
    if parts[0] == ".staging":
        return "staging"
    if rel == "runs/zarr.json":
        return "runs"
    if len(parts) == 3:
        return "run"
    if len(parts) == 4:
        return "group"
    if len(parts) == 5:
        return "prompt_node" if parts[2] == "prompts" else "trajectory_node"
    if len(parts) == 6:
        return "array_meta"
    if parts[5] == "c":
        return "shard"
    raise ValueError(f"unknown store file {rel}")


def _shard_index_size(store: Path, rel: str) -> int:
    """Bytes of a shard's index (at its end): 16 per inner chunk, then its crc32c."""
    array_dir = store.joinpath(*rel.split("/")[:5])
    meta = json.loads((array_dir / "zarr.json").read_text())
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    inner = meta["codecs"][0]["configuration"]["chunk_shape"]
    return 16 * int(np.prod([s // i for s, i in zip(shard, inner, strict=True)])) + 4


def _mutations(
    store: Path, rel: str, kind: str, data: bytes, m: int, rng: random.Random
) -> list[tuple[str, bytes | None]]:
    """(name, new bytes or None for deletion) of the mutations of one file."""
    out: list[tuple[str, bytes | None]] = []

    def flip(lo: int, hi: int) -> bytes:
        buf = bytearray(data)
        pos = rng.randrange(lo, hi)
        buf[pos] ^= (1 << rng.randrange(8)) if rng.random() < 0.5 else rng.randrange(1, 256)
        return bytes(buf)

    if kind == "shard":
        index = min(_shard_index_size(store, rel), len(data))
        out += [("flip_data", flip(0, len(data) - index)) for _ in range(m) if len(data) > index]
        out += [("flip_index", flip(len(data) - index, len(data))) for _ in range(m)]
    else:
        out += [("flip", flip(0, len(data))) for _ in range(m)]
        digits = [i for i, b in enumerate(data) if 48 <= b <= 57]
        for _ in range(m if digits else 0):
            buf = bytearray(data)
            pos = rng.choice(digits)
            buf[pos] = rng.choice([d for d in b"0123456789" if d != buf[pos]])
            out.append(("digit", bytes(buf)))
    cuts = [0] + [rng.randrange(1, len(data)) for _ in range(m - 1)] if len(data) > 1 else [0]
    out += [("truncate", data[:cut]) for cut in cuts[:m]]
    out.append(("delete", None))
    return out


def _json_changes(old: bytes, new: bytes | None) -> list[list[Any]] | None:
    """The JSON paths (lists of keys and indices) a mutation of a JSON file changed; None if it
    is not JSON any more."""
    if new is None:
        return None
    try:
        a, b = json.loads(old), json.loads(new)
    except (ValueError, RecursionError):
        return None
    missing = object()

    def diff(x: Any, y: Any, where: list[Any]) -> list[list[Any]]:
        if isinstance(x, dict) and isinstance(y, dict):
            keys = sorted(set(x) | set(y))
            return [p for k in keys for p in diff(x.get(k, missing), y.get(k, missing), [*where, k])]
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            return [p for i, (u, v) in enumerate(zip(x, y, strict=True)) for p in diff(u, v, [*where, i])]
        return [] if x == y and type(x) is type(y) else [where]

    return diff(a, b, [])


def _tally(verdict: dict[str, list[str]], row: Counter[str], cases: dict[str, list], case: dict[str, Any]) -> None:
    """Counts one injected change in ``row`` by its `_judge` verdict (wrong reads first, then
    crashes, then detections; else harmless) and keeps the case of each kind but detected."""
    if verdict["wrong"]:
        row["silent_wrong"] += 1
        cases["silent_wrong"].append({**case, "reads": verdict["wrong"][:5]})
    elif verdict["crash"]:
        row["crash"] += 1
        cases["crash"].append({**case, "reads": verdict["crash"][:3]})
    elif verdict["detected"]:
        row["detected"] += 1
    else:
        row["harmless"] += 1
        cases["harmless"].append(case)


def corruption_sweep(
    workdir: str | Path,
    codecs: Iterable[str] = ("lossless", "int8", "int4"),
    mutations_per_file: int = 2,
    seed: int = 0,
    max_files_per_kind: int | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Mutates every file (or ``max_files_per_kind`` per kind and codec) of small stores, one
    mutation at a time, and reads everything back with a fresh reader.

    Counts per ``kind/mutation``: ``injected`` (the file's content changed), ``detected`` (some
    read raised a `StoreError` and none returned wrong data), ``harmless`` (every read returned
    the truth), ``silent_wrong`` (a read returned something else without error), ``crash`` (a
    read raised something that is not a `StoreError`), ``noop`` (JSON equal to the original).
    """
    workdir = Path(workdir) / "corruption"
    rng = random.Random(f"{seed}-corruption")
    start = time.monotonic()
    table: dict[str, Counter[str]] = {}
    cases: dict[str, list[dict[str, Any]]] = {"silent_wrong": [], "crash": [], "harmless": [], "folder_removed": []}
    for codec in codecs:
        store = workdir / codec
        shutil.rmtree(store, ignore_errors=True)
        _build_store(store, codec, dict(CORRUPT_RUNS))
        with SnapshotStore.open(store, mode="r+") as s:
            s.annotate(ANNOTATED[0], ANNOTATED[1], **ANNOTATED[2])
        truth = _truth(codec)
        baseline = _judge(_observe(store), truth)
        if any(baseline.values()):
            raise RuntimeError(f"the untouched {codec} store does not read back as the truth: {baseline}")
        files = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
        by_kind: dict[str, list[str]] = {}
        for rel in files:
            if classify(rel) != "staging":  # the writers' lock files: readers never open them
                by_kind.setdefault(classify(rel), []).append(rel)
        for kind, rels in sorted(by_kind.items()):
            if max_files_per_kind is not None:
                rels = rng.sample(rels, min(max_files_per_kind, len(rels)))
            for rel in rels:
                target = store / rel
                original = target.read_bytes()
                for name, new in _mutations(store, rel, kind, original, mutations_per_file, rng):
                    row = table.setdefault(f"{kind}/{name}", Counter())
                    changes = None if kind == "shard" else _json_changes(original, new)
                    if new == original or changes == []:
                        row["noop"] += 1
                        continue
                    row["injected"] += 1
                    if new is None:
                        target.unlink()
                    else:
                        target.write_bytes(new)
                    try:
                        verdict = _judge(_observe(store), truth)
                    finally:
                        target.write_bytes(original)
                    case = {"codec": codec, "file": rel, "mutation": name, "changed": changes}
                    _tally(verdict, row, cases, case)
        for node in sorted({str(Path(f).parent) for f in files if classify(f) in ("prompt_node", "trajectory_node")}):
            # informational: a whole node folder removed (no manifest lists a run's trajectories)
            aside = store.parent / f"{codec}-aside"
            os.rename(store / node, aside)
            try:
                verdict = _judge(_observe(store), truth)
            finally:
                os.rename(aside, store / node)
            cases["folder_removed"].append(
                {"codec": codec, "folder": node, "wrong": verdict["wrong"][:3], "detected": len(verdict["detected"])}
            )
        final = _judge(_observe(store), truth)
        if any(final.values()):
            raise RuntimeError(f"the {codec} store was not restored after the sweep: {final}")
        log(f"[corruption {codec}] {len(files)} files, {sum(r['injected'] for r in table.values())} injected so far")
    totals = Counter()
    for row in table.values():
        totals.update(row)
    result = {
        "codecs": list(codecs),
        "mutations_per_file": mutations_per_file,
        "kinds": sorted({k.split("/")[0] for k in table}),
        "table": {k: dict(v) for k, v in sorted(table.items())},
        **{k: totals[k] for k in ("injected", "detected", "harmless", "silent_wrong", "crash", "noop")},
        "cases": {k: v[:40] for k, v in cases.items()},
        "folder_removed_silent": sum(bool(c["wrong"]) for c in cases["folder_removed"]),
        "folder_removed": len(cases["folder_removed"]),
        "seconds": round(time.monotonic() - start, 1),
    }
    rate = result["detected"] / max(1, result["injected"])
    log(
        f"[corruption] {result['injected']} injected, {result['detected']} detected ({rate:.1%}), "
        f"{result['harmless']} harmless, {result['silent_wrong']} silent wrong, "
        f"{result['crash']} crashes, {result['seconds']} s"
    )
    return result


# -- files exchanged between nodes ---------------------------------------------------------
def _node_folders(store: Path) -> list[str]:
    return sorted(
        str(p.relative_to(store))
        for p in store.glob("runs/*/*/*")
        if p.is_dir() and classify(str(p.relative_to(store)) + "/zarr.json") in ("prompt_node", "trajectory_node")
    )


def _exchanges(store: Path, rng: random.Random, max_pairs: int | None) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """``(name, [(source, target), ...])``: file copies that move valid data between two nodes of a
    kind: a node folder's every file over another's ("copy_node"), one data file swapped with the
    same file of another node ("swap_shard"), the node metadata swapped ("swap_meta")."""
    folders = _node_folders(store)
    pairs = [(a, b) for a in folders for b in folders if a != b and a.split("/")[2] == b.split("/")[2]]
    if max_pairs is not None:
        pairs = rng.sample(pairs, min(max_pairs, len(pairs)))
    for a, b in pairs:
        files = [str(p.relative_to(store / a)) for p in (store / a).rglob("*") if p.is_file()]
        shared = [f for f in files if (store / b / f).is_file()]
        yield "copy_node", [(f"{a}/{f}", f"{b}/{f}") for f in files]
        shards = [f for f in shared if f.split("/")[1:2] == ["c"]]
        if shards:
            f = rng.choice(shards)
            yield "swap_shard", [(f"{a}/{f}", f"{b}/{f}"), (f"{b}/{f}", f"{a}/{f}")]
        yield "swap_meta", [(f"{a}/zarr.json", f"{b}/zarr.json"), (f"{b}/zarr.json", f"{a}/zarr.json")]


def exchange_sweep(
    workdir: str | Path, codecs: Iterable[str], seed: int = 0, max_pairs: int | None = None, log: Log = _quiet
) -> dict[str, Any]:
    """Moves whole valid files between nodes of the corruption stores (`_exchanges`), one exchange
    at a time, and reads everything back with a fresh reader, judged as `corruption_sweep` judges.
    Every file stays intact (crc32c and all): only a node's sealed identity and content hashes
    can tell. Counts per ``kind/exchange``: ``injected``, ``detected``, ``harmless`` (the two
    files were equal), ``silent_wrong``, ``crash``."""
    workdir = Path(workdir) / "exchange"
    rng = random.Random(f"{seed}-exchange")
    start = time.monotonic()
    table: dict[str, Counter[str]] = {}
    cases: dict[str, list[dict[str, Any]]] = {"silent_wrong": [], "crash": [], "harmless": []}
    for codec in codecs:
        store = workdir / codec
        shutil.rmtree(store, ignore_errors=True)
        _build_store(store, codec, dict(CORRUPT_RUNS))
        with SnapshotStore.open(store, mode="r+") as s:
            s.annotate(ANNOTATED[0], ANNOTATED[1], **ANNOTATED[2])
        truth = _truth(codec)
        for name, moves in _exchanges(store, rng, max_pairs):
            kind = "prompt" if "/prompts/" in moves[0][0] else "trajectory"
            row = table.setdefault(f"{kind}/{name}", Counter())
            originals = {target: (store / target).read_bytes() for _, target in moves}
            contents = {source: (store / source).read_bytes() for source, _ in moves}
            if all(contents[source] == originals[target] for source, target in moves):
                row["noop"] += 1
                continue
            row["injected"] += 1
            try:
                for source, target in moves:
                    (store / target).write_bytes(contents[source])
                verdict = _judge(_observe(store), truth)
            finally:
                for target, data in originals.items():
                    (store / target).write_bytes(data)
            _tally(verdict, row, cases, {"codec": codec, "moves": moves[:2]})
        log(f"[exchange {codec}] {sum(r['injected'] for r in table.values())} injected so far")
    totals = Counter()
    for row in table.values():
        totals.update(row)
    result = {
        "table": {k: dict(v) for k, v in sorted(table.items())},
        **{k: totals[k] for k in ("injected", "detected", "harmless", "silent_wrong", "crash", "noop")},
        "cases": {k: v[:40] for k, v in cases.items()},
        "seconds": round(time.monotonic() - start, 1),
    }
    log(f"[exchange] {result['injected']} injected, {result['detected']} detected, {result['silent_wrong']} wrong")
    return result


# -- deletions racing writers and readers --------------------------------------------------
def delete_race_sweep(rounds: int, workdir: str | Path, seed: int = 0, log: Log = _quiet) -> dict[str, Any]:
    """Each round: a worker spills 40 trajectories into run ``r`` (one flush each) while this
    process deletes ``r`` at a random moment, and a long-lived read handle opened before reads
    ``r`` before and after, while a second round of data (other KV under the same ids) is
    spilled. Invariants: the worker ends normally or with the error naming the deletion; the
    listing and `verify` stay clean (no run folder without metadata); every trajectory visible
    reads exactly as spilled; the old handle reads each id as the data now stored or raises a
    `StoreError`, never anything else."""
    workdir = Path(workdir) / "delete-race"
    rng = random.Random(f"{seed}-delete-race")
    stats: Counter[str] = Counter()
    violations: list[str] = []
    for i in range(rounds):
        path = workdir / f"s{i}"
        shutil.rmtree(path, ignore_errors=True)
        _build_store(path, "lossless", {"r": (0,)})
        reader = SnapshotStore.open(path, mode="r")
        reader.read_prefix("r", tid_of(0), length(0))  # caches run r's first generation
        worker = _Worker("spill", {"path": str(path), "codec": "lossless", "durability": "trajectory", "run": "r",
                                   "count": SPILL_COUNT, "group": 1})  # fmt: skip
        worker.wait_for("ready")
        time.sleep(rng.uniform(0.0, 0.6))
        with SnapshotStore.open(path, mode="r+") as deleter:
            deleted = "r" in deleter.runs()
            if deleted:
                deleter.delete_run("r")
        worker._collect()
        stats["rounds"] += 1
        stats["deleted_mid_spill"] += deleted and worker.proc.returncode != 0
        if worker.proc.returncode not in (0,) and "was deleted while trajectory" not in worker.stderr:
            violations.append(f"round {i}: the spill failed without naming the deletion: {worker.stderr[-500:]}")
        with SnapshotStore.open(path, mode="r+") as store:
            try:
                runs, problems = store.runs(), store.verify()
            except StoreError as err:
                violations.append(f"round {i}: the listing broke: {err}")
                continue
            if problems:
                violations.append(f"round {i}: verify found {[p.message for p in problems][:3]}")
            for tid in store.trajectories("r") if "r" in runs else []:
                violations += _split(
                    _check_trajectory(store, "r", tid, "lossless", campaign_fields(n_of(tid))), f"round {i}"
                )
            for n in range(3):  # the run written again: the same ids, other data (n + 100)
                if "r" in store.runs() and tid_of(n) in store.trajectories("r"):
                    continue
                store.spill("r", tid_of(n), campaign_state(n + 100), prompt_len(n + 100), **campaign_fields(n + 100))
        with SnapshotStore.open(path, mode="r") as fresh:
            for tid in fresh.trajectories("r"):
                want = fresh.read_prefix("r", tid, fresh.trajectory_info("r", tid)["length"])
                try:
                    got = reader.read_prefix("r", tid, len(want.token_ids[0]))
                except StoreError:
                    stats["reader_raised"] += 1
                    continue
                same = all(np.array_equal(a, b) for a, b in ((got.keys, want.keys), (got.values, want.values),
                                                               (got.token_ids, want.token_ids)))  # fmt: skip
                stats["reader_new_whole"] += same
                if not same:
                    violations.append(f"round {i}: the old handle read {tid} as something else than what is stored")
        reader.close()
        shutil.rmtree(path, ignore_errors=True)
    log(f"[delete race] {dict(stats)}, {len(violations)} violations")
    return {**stats, "violations": violations}


# -- bad input at the door -----------------------------------------------------------------
DOOR_KINDS = ("token_negative", "token_too_large", "nan", "+inf", "-inf")
DOOR_FORMS = ("host", "encoded")  # a CachedState, or its codes as `capture_encoded` hands them over
DOOR_CODECS = ("lossless", "int8", "int4")
DURABILITIES = ("trajectory", "flush")
DOOR_CASES_PER_STORE = 10
_TOKEN_MESSAGE = re.compile(r"token id (-?\d+) at position (\d+) is outside \[0, (\d+)\)")
_HOST_KV_MESSAGE = re.compile(r"(keys|values) hold non-finite numbers \(NaN/Inf\) at layer (\d+), position (\d+)")
_ENCODED_KV_MESSAGE = re.compile(r"the encoded (prompt|response) array '\w+' holds non-finite numbers")


def _encoded_state(state: CachedState, codec: str, plen: int) -> EncodedState:
    """``state`` encoded by ``codec`` on the host, prompt and response apart, as
    `vinekv.kvstore.capture.capture_encoded` hands it to `spill` (tests/test_store_door.py does the same)."""
    c = get_codec(codec)
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # int4's host encode of Inf warns
        warnings.simplefilter("ignore", RuntimeWarning)
        parts = [c.encode(state.keys[:, 0, lo:hi], state.values[:, 0, lo:hi]) for lo, hi in ((0, plen), (plen, None))]
    return EncodedState(*parts, c.spec(), state.token_ids, plen, state.layout, state.fingerprint)


def _bad_input(kind: str, n: int, rng: random.Random) -> tuple[CachedState, dict[str, Any]]:
    """Trajectory ``n`` with 1 (70%) to 5 bad cells of ``kind`` in its prompt or its response:
    the state and what a refusal must name (``ids``: (id, position) pairs; ``cells``: (array,
    layer, position) triples; ``parts``)."""
    state = campaign_state(n)  # fresh arrays
    plen, size = prompt_len(n), length(n)
    part = rng.choice(("prompt", "response"))
    lo, hi = (0, plen) if part == "prompt" else (plen, size)
    positions = rng.sample(range(lo, hi), 1 if rng.random() < 0.7 else rng.randint(2, 5))
    vocab = LAYOUT.vocab_size
    what: dict[str, Any] = {"part": part, "count": len(positions), "ids": set(), "cells": set()}
    for p in positions:
        if kind == "token_negative":
            bad = rng.choice((-1, -(2**31), rng.randint(-(2**31), -1)))
        elif kind == "token_too_large":
            bad = rng.choice((vocab, 2**31 - 1, rng.randint(vocab, 2**31 - 1)))
        if kind.startswith("token"):
            state.token_ids[0, p] = bad
            what["ids"].add((bad, p))
            continue
        name = what.setdefault("array", rng.choice(("keys", "values")))
        layer = rng.randrange(LAYOUT.num_layers)
        head, dim = rng.randrange(LAYOUT.num_kv_heads), rng.randrange(LAYOUT.head_dim)
        getattr(state, name)[layer, 0, p, head, dim] = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}[kind]
        what["cells"].add((name, layer, p))
    return state, what


def _names_the_problem(message: str, kind: str, form: str, what: dict[str, Any]) -> bool:
    """Whether a refusal's message names one of the bad cells injected (the encoded form: the
    part that holds them; the codes carry no position)."""
    if kind.startswith("token"):
        found = _TOKEN_MESSAGE.search(message)
        if found is None or int(found[3]) != LAYOUT.vocab_size:
            return False
        return (int(found[1]), int(found[2])) in what["ids"]
    if form == "host":
        found = _HOST_KV_MESSAGE.search(message)
        return found is not None and (found[1], int(found[2]), int(found[3])) in what["cells"]
    found = _ENCODED_KV_MESSAGE.search(message)
    return found is not None and found[1] == what["part"]


def door_sweep(cases: int, workdir: str | Path, seed: int = 0, log: Log = _quiet) -> dict[str, Any]:
    """Spills ``cases`` bad inputs (`DOOR_KINDS`: token ids below 0 or at least the vocabulary,
    NaN, +Inf, -Inf in the keys or the values; 1 to 5 bad cells at random positions of the
    prompt or the response) as host `CachedState`s or host-encoded `EncodedState`s, into stores
    of each codec and durability (`DOOR_CASES_PER_STORE` per store), good spills of both forms
    interleaved, flushes at random. A bad spill's id is a fresh one, the next good spill's, or
    one in a run that only bad spills name. Each bad spill must raise a ValueError that names
    the problem (the id and its position; the array, layer and position; for codes the part);
    nothing of it may be stored (the run lists exactly the good spills; a run only bad spills
    named does not exist); every good spill reads back exactly; `verify` is clean; the closed
    store has no leftovers. Counts per ``kind/codec`` as `_tally` counts them: ``detected``
    (refused, problem named), ``silent_wrong`` (accepted), ``crash`` (another error, or a message
    that does not name the problem)."""
    workdir = Path(workdir) / "door"
    rng = random.Random(f"{seed}-door")
    start = time.monotonic()
    configs = [(c, d) for c in DOOR_CODECS for d in DURABILITIES]
    table: dict[str, Counter[str]] = {}
    cases_kept: dict[str, list[dict[str, Any]]] = {"silent_wrong": [], "crash": [], "harmless": []}
    stats: Counter[str] = Counter()
    violations: list[str] = []
    done, episode = 0, 0
    while done < cases:
        codec, durability = configs[episode % len(configs)]
        count = min(DOOR_CASES_PER_STORE, cases - done)
        path = workdir / f"e{episode}-{codec}-{durability}"
        shutil.rmtree(path, ignore_errors=True)
        where = f"door store {episode} ({codec}, {durability})"
        problems = _door_store(path, codec, durability, range(done, done + count), rng, table, cases_kept, stats)
        violations += _split(problems, where)
        stats[f"cases_{durability}"] += count
        shutil.rmtree(path, ignore_errors=True)
        done += count
        episode += 1
    totals: Counter[str] = Counter()
    for row in table.values():
        totals.update(row)
    result = {
        "stores": episode,
        "table": {k: dict(v) for k, v in sorted(table.items())},
        **{k: totals[k] for k in ("injected", "detected", "harmless", "silent_wrong", "crash")},
        **dict(sorted(stats.items())),
        "cases": {k: v[:40] for k, v in cases_kept.items()},
        "violations": violations,
        "seconds": round(time.monotonic() - start, 1),
    }
    log(
        f"[door] {result['injected']} bad spills, {result['detected']} refused naming the problem, "
        f"{result['silent_wrong']} accepted, {result['crash']} other errors; {stats['good_checked']} good spills "
        f"read back; {len(violations)} violations, {result['seconds']} s"
    )
    return result


@_reported(_problems)
def _door_store(
    path: Path,
    codec: str,
    durability: str,
    case_numbers: range,
    rng: random.Random,
    table: dict[str, Counter[str]],
    cases_kept: dict[str, list[dict[str, Any]]],
    stats: Counter[str],
) -> list[str]:
    """One store of `door_sweep`: the bad spills of ``case_numbers`` among good ones."""
    problems: list[str] = []
    good: list[int] = []  # trajectories spilled good, in run "r"
    next_good = 100 * case_numbers.start  # distinct ids (and KV) per store
    store = SnapshotStore.open(path, codec=codec, chunk_tokens=CHUNK_TOKENS, durability=durability)
    try:

        def spill_good() -> None:
            nonlocal next_good
            n, form = next_good, rng.choice(DOOR_FORMS)
            state = campaign_state(n) if form == "host" else _encoded_state(campaign_state(n), codec, prompt_len(n))
            try:
                store.spill("r", tid_of(n), state, prompt_len(n), **campaign_fields(n))
            except Exception as err:  # the refusals before it must leave the door open
                problems.append(f"good spill of {tid_of(n)} ({form}) raised {type(err).__name__}: {err}")
            else:
                good.append(n)
                stats[f"good_{form}"] += 1
            next_good += 1

        for c in case_numbers:
            kind, form = DOOR_KINDS[c % len(DOOR_KINDS)], DOOR_FORMS[(c // len(DOOR_KINDS)) % len(DOOR_FORMS)]
            if rng.random() < 0.5:
                spill_good()
            n = next_good + 50  # the bad trajectory's data
            run, tid = "r", f"b{c:05d}"
            target = rng.random()
            if target < 0.4:
                tid = tid_of(next_good)  # the id the next good spill takes
            elif target < 0.6:
                run = "x"  # a run that only bad spills name
            stats[f"target_{'next_good_id' if target < 0.4 else 'bad_only_run' if target < 0.6 else 'fresh_id'}"] += 1
            state, what = _bad_input(kind, n, rng)
            spilled = state if form == "host" else _encoded_state(state, codec, prompt_len(n))
            verdict: dict[str, list[str]] = {"wrong": [], "crash": [], "detected": []}
            try:
                store.spill(run, tid, spilled, prompt_len(n), **campaign_fields(n))
                verdict["wrong"].append(f"{run}/{tid}: accepted")
            except ValueError as err:
                named = _names_the_problem(str(err), kind, form, what)
                verdict["detected" if named else "crash"].append(f"{run}/{tid}: ValueError: {str(err)[:200]}")
            except Exception as err:  # anything else at the door is a crash
                verdict["crash"].append(f"{run}/{tid}: {type(err).__name__}: {str(err)[:200]}")
            row = table.setdefault(f"{kind}/{codec}", Counter())
            row["injected"] += 1
            row[form] += 1
            row[what["part"]] += 1
            row["several_cells"] += what["count"] > 1
            case = {"kind": kind, "form": form, "codec": codec, "durability": durability, "part": what["part"]}
            _tally(verdict, row, cases_kept, {**case, "cells": sorted(map(str, what["ids"] | what["cells"]))[:5]})
            if rng.random() < 0.5:
                spill_good()
            if rng.random() < 0.3:
                store.flush()
        spill_good()
        store.flush()
        runs = store.runs()
        if runs != (["r"] if good else []):
            problems.append(f"runs {runs} (a run only bad spills named must not exist)")
        ids = store.trajectories("r") if "r" in runs else []
        if ids != sorted(tid_of(n) for n in good):
            problems.append(f"run r holds {ids}, the good spills were {sorted(tid_of(n) for n in good)}")
        for tid in ids:
            problems += _checked_trajectory(store, "r", tid, codec, campaign_fields(n_of(tid)))
        stats["good_checked"] += len(ids)
        problems += [f"verify: {p.message}" for p in store.verify()]
    finally:
        store.close()
    problems += _leftover_problems(path)
    with SnapshotStore.open(path, mode="r") as reader:  # what the writer listed is committed
        listed = reader.trajectories("r") if "r" in reader.runs() else []
        if listed != ids or reader.runs() != runs:
            problems.append(f"a fresh reader lists runs {reader.runs()}, trajectories {listed}")
    return problems


# -- exit without close() ------------------------------------------------------------------
# The promise: what was spilled is committed (a thread racing the exit's close: what returned; one
# opening a store after the exit hook is refused, nothing created).
EXIT_MODES = ("end", "sys_exit", "exception", "dropped", "late_thread", "racing_thread")
THREAD_EXITS = ("late_thread", "racing_thread")
NOT_PROMISED_EXITS = ("os_exit",)  # a kill: reported apart (docs/reliability.md)
EXIT_TOTALS = ("rounds", "spilled", "committed", "warned", "busy_at_exit", "refused", "open_refused", "aborted")
EXIT_RC = {"exception": 1}
EXIT_WARNING = re.compile(r"was not closed: committing (\d+) spilled trajectories")
EXIT_SCRIPT = r"""
import gc, json, os, sys, threading, time
from _campaign_worker import CHUNK_TOKENS, campaign_fields, campaign_state, prompt_len
from vinekv.kvstore import SnapshotStore

a = json.loads(sys.argv[1])


def open_store():
    store = SnapshotStore.open(a["path"], codec=a["codec"], chunk_tokens=CHUNK_TOKENS, durability=a["durability"],
                               max_inflight_bytes=a["budget"], write_concurrency=a["writers"])
    print("open", flush=True)
    return store


def spill(store=None):
    if a["late"]:
        time.sleep(0.2)  # the main thread has returned: its exit hooks have run
        try:
            store = open_store()
        except Exception as err:  # refused: nothing would close the store
            print("open-refused", type(err).__name__, json.dumps(str(err)), flush=True)
            return None
    store = store or open_store()
    for i, n in enumerate(a["ns"]):
        try:
            store.spill("r", "t%03d" % n, campaign_state(n), prompt_len(n), **campaign_fields(n))
        except Exception as err:  # the store is closed at exit under a thread still spilling
            print("refused", n, type(err).__name__, json.dumps(str(err)), flush=True)
            return store
        print("spilled", n, flush=True)
        if i + 1 == a["flush_after"]:
            try:
                store.flush()
            except Exception as err:  # the same, when the close began after the spill returned
                print("refused flush", type(err).__name__, json.dumps(str(err)), flush=True)
                return store
            print("flushed", flush=True)
        time.sleep(a["throttle"])
    print("written", store.stats["spilled"], flush=True)  # the rest is still queued at exit
    return store


mode = a["exit"]
if mode == "dropped":
    spill()  # the store is dropped unclosed
    gc.collect()
elif mode in ("late_thread", "racing_thread"):
    store = None if a["late"] else open_store()
    threading.Thread(target=spill, args=(store,)).start()  # not a daemon: the interpreter waits for it
    time.sleep(a["delay"])
    del store
else:
    store = spill()
if mode == "sys_exit":
    sys.exit(0)
if mode == "exception":
    raise RuntimeError("planned failure after spilling")
if mode == "os_exit":
    sys.stdout.flush()
    os._exit(0)
"""


def _exit_round(i: int, mode: str, rng: random.Random, workdir: Path, max_spills: int) -> dict[str, Any]:
    """The arguments of an `exit_sweep` worker (``i``: its round plus its mode's index; even:
    ``durability="trajectory"``) with a random codec, count, flush and byte budget ("tight": each
    spill waits for the one before; "large": all are queued at once)."""
    durability = DURABILITIES[i % 2]
    count = 0 if rng.random() < 0.08 else rng.randint(1, max_spills)
    if mode == "racing_thread":
        count = rng.randint(30, 50)  # 0.9-1.5 s of spills (throttled): the exit (0.05-0.6 s) lands among them
    tight = rng.random() < 0.4
    args = {
        "path": str(workdir / f"x{i}-{mode}-{durability}-{rng.randrange(10**6)}"),
        "codec": rng.choice(DOOR_CODECS),
        "durability": durability,
        "ns": list(range(count)),
        "flush_after": rng.randint(1, count) if count and rng.random() < 0.4 else None,
        "budget": 1 if tight else 512 * 2**20,
        "writers": rng.randint(1, 4),
        "exit": mode,
        "late": mode == "late_thread",
        "throttle": 0.03 if mode == "racing_thread" else 0.0,
        "delay": rng.uniform(0.05, 0.6) if mode == "racing_thread" else 0.0,
        "existing": mode == "late_thread" and rng.random() < 0.5,  # the late open finds a store there
    }
    shutil.rmtree(args["path"], ignore_errors=True)
    if args["existing"]:
        _build_store(Path(args["path"]), args["codec"], {"old": (0, 1)}, durability)
    return args


def _run_exit_workers(rounds: list[dict[str, Any]], parallel: int) -> list[subprocess.CompletedProcess]:
    """Runs the `EXIT_SCRIPT` of each round, ``parallel`` at a time."""
    out: list[Any] = [None] * len(rounds)
    pending = list(enumerate(rounds))
    running: list[tuple[int, subprocess.Popen, float]] = []
    while pending or running:
        while pending and len(running) < parallel:
            i, args = pending.pop(0)
            proc = subprocess.Popen(
                [sys.executable, "-c", EXIT_SCRIPT, json.dumps(args)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
                cwd=REPO,
            )
            running.append((i, proc, time.monotonic()))
        i, proc, started = running.pop(0)
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, WORKER_TIMEOUT - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:  # a hung exit is a violation
            proc.kill()
            stdout, stderr = proc.communicate()
            stderr += "\n[campaign] killed: the worker did not exit"
        out[i] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def exit_sweep(
    rounds: int,
    workdir: str | Path,
    seed: int = 0,
    modes: Iterable[str] = EXIT_MODES + NOT_PROMISED_EXITS,
    parallel: int = 2,
    max_spills: int = 40,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Worker processes open a store (random codec, either durability), spill 0-``max_spills``
    trajectories (a flush after a random one in 40% of rounds; a byte budget of one trajectory
    in 40%, so that the last spill is still being written at exit, else all are queued at once)
    and exit without `close()`: at the end of the script, by ``sys.exit(0)``, by an uncaught
    exception, or after dropping the store (``rounds`` of each, ``parallel`` at a time).
    Invariants: the exit code is 0 (1 for the exception), never an abort; stderr says
    "was not closed: committing N spilled trajectories" with N the spills since the last flush,
    and nothing when N is 0; every spill is committed and reads back exactly; `verify` is clean;
    nothing is left over.

    Two exits where a non-daemon thread still works when the main thread returns (the store's
    exit hook runs before such threads are joined), promised too (`THREAD_EXITS`):
    ``racing_thread`` spills 30-50 trajectories, one per 30 ms, while the hook closes the store
    (the main thread returns 0.05-0.6 s in): every spill that returned is committed and exact,
    nothing else is, the first refused spill (or flush) raised a RuntimeError naming "closed" (else
    every spill returned), the warning's N is at most the spills returned since the last flush, exit
    code 0, no abort, `verify` clean, no leftovers. ``late_thread`` opens the store for writing
    after the hook ran (a fresh path, or in half the rounds a store built beforehand): the open
    raises RuntimeError ("the interpreter is exiting"), the path is not created (the existing
    store's files are unchanged, sizes and mtimes), exit code 0, no abort.

    Not promised, counted apart (``not_promised``: spills returned, committed, lost, aborts):
    ``os._exit`` (a kill: what is visible must still read exactly, the next writer sweeps the
    rest)."""
    workdir = Path(workdir) / "exit"
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-exit")
    start = time.monotonic()
    modes = tuple(modes)
    plan = [_exit_round(i + j, mode, rng, workdir, max_spills) for i in range(rounds) for j, mode in enumerate(modes)]
    before = {i: _tree(Path(args["path"]), []) for i, args in enumerate(plan) if args["existing"]}
    procs = _run_exit_workers(plan, parallel)
    table: dict[str, Counter[str]] = {}
    not_promised: dict[str, Counter[str]] = {}
    violations: list[str] = []
    samples: dict[str, str] = {}
    for i, (args, proc) in enumerate(zip(plan, procs, strict=True)):
        mode, promised = args["exit"], args["exit"] in EXIT_MODES
        key = f"{mode}/{args['durability']}"
        row = (table if promised else not_promised).setdefault(key, Counter())
        where = f"exit round {i} ({mode}, {args['codec']}, {args['durability']}, {len(args['ns'])} spills)"
        problems, outcome = _check_exit(args, proc, promised, before.get(i))
        row["rounds"] += 1
        row.update(outcome)
        violations += _split(problems, where)
        for name, prefix in (("refused", "refused "), ("open_refused", "open-refused ")):
            line = next((x for x in proc.stdout.split("\n") if x.startswith(prefix)), None)
            if line and f"{key}:{name}" not in samples:
                samples[f"{key}:{name}"] = f"{where}: {line}"
        for name in ("lost", "aborted"):
            if outcome.get(name) and f"{key}:{name}" not in samples:
                samples[f"{key}:{name}"] = f"{where}: rc {proc.returncode}; {proc.stderr.strip()[-400:]}"
        shutil.rmtree(args["path"], ignore_errors=True)
    totals: Counter[str] = Counter()
    for row in table.values():
        totals.update(row)
    result = {
        "rounds_per_mode": rounds,
        "modes": list(modes),
        "table": {k: dict(v) for k, v in sorted(table.items())},
        **{k: totals[k] for k in EXIT_TOTALS},
        "not_promised": {k: dict(v) for k, v in sorted(not_promised.items())},
        "samples": samples,
        "violations": violations,
        "seconds": round(time.monotonic() - start, 1),
    }
    lost = {k: v.get("lost", 0) for k, v in result["not_promised"].items()}
    log(
        f"[exit] {totals['rounds']} exits without close, {totals['spilled']} spills, {totals['committed']} "
        f"committed, {totals['busy_at_exit']} with the queue busy at exit, {totals['refused']} racing spills "
        f"refused after the close began, {totals['open_refused']} late opens refused; not promised, lost: {lost}; "
        f"{len(violations)} violations, {result['seconds']} s"
    )
    return result


def _check_exit(
    args: dict[str, Any], proc: subprocess.CompletedProcess, promised: bool, before: dict[str, Any] | None
) -> tuple[list[str], dict]:
    """Problems and counts of one `exit_sweep` round (``before``: the files of the store the
    late thread found, if one was built beforehand)."""
    problems: list[str] = []
    lines = proc.stdout.split("\n")
    spilled = {int(x.split()[1]) for x in lines if x.startswith("spilled ")}
    refused = [x.split(" ", 3) for x in lines if x.startswith("refused ")]
    open_refused = [x.split(" ", 2) for x in lines if x.startswith("open-refused ")]
    written = next((int(x.split()[1]) for x in lines if x.startswith("written ")), None)
    flushed = "flushed" in lines
    unflushed = len(spilled) - (args["flush_after"] if flushed else 0)
    warnings_ = [int(m[1]) for m in EXIT_WARNING.finditer(proc.stderr)]
    aborted = proc.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT) or "terminate called" in proc.stderr
    outcome = Counter(
        spilled=len(spilled),
        warned=bool(warnings_),
        aborted=aborted,
        refused=len(refused),
        open_refused=len(open_refused),
        existing=args["existing"],
    )
    outcome["busy_at_exit"] += written is not None and written < len(spilled)
    mode = args["exit"]
    expected_rc = EXIT_RC.get(mode, 0)
    if promised:
        if proc.returncode != expected_rc or aborted or "Fatal Python error" in proc.stderr:
            problems.append(f"exit code {proc.returncode} (expected {expected_rc}): {proc.stderr.strip()[-600:]}")
        if "Exception in thread" in proc.stderr:
            problems.append(f"a thread died: {proc.stderr.strip()[-600:]}")
        if "could not be committed at exit" in proc.stderr:
            problems.append(f"the commit at exit failed: {proc.stderr.strip()[-400:]}")
        if mode == "late_thread":
            problems += _check_late_exit(args, spilled, open_refused, before)
        elif mode == "racing_thread":
            problems += _check_racing_exit(args, spilled, refused, written, warnings_, unflushed)
        else:
            if spilled != set(args["ns"]) or refused:
                problems.append(f"the worker spilled {len(spilled)} of {len(args['ns'])} ({refused[:2]})")
            if warnings_ != ([unflushed] if unflushed else []):
                problems.append(f"stderr said committing {warnings_}, expected {[unflushed] if unflushed else []}")
            if mode == "exception" and "RuntimeError: planned failure after spilling" not in proc.stderr:
                problems.append("the uncaught exception's traceback is missing")
        problems += [f"left over after the exit: {rel}" for rel in _leftovers(Path(args["path"]))]
    committed, checks = _check_exit_store(Path(args["path"]), args["codec"], spilled if promised else None)
    problems += checks
    outcome["committed"] = len(committed)
    outcome["lost"] = len(spilled - committed)
    outcome["rounds_with_loss"] = bool(spilled - committed)
    if promised and spilled - committed:
        problems.append(f"spilled but not committed: {sorted(spilled - committed)[:10]}")
    if promised and committed - spilled:
        problems.append(f"committed, but the spill never returned: {sorted(committed - spilled)[:10]}")
    return problems, outcome


def _check_racing_exit(
    args: dict[str, Any],
    spilled: set[int],
    refused: list[list[str]],
    written: int | None,
    warned: list[int],
    unflushed: int,
) -> list[str]:
    """A thread spilling while the exit hook closed the store: the spills that returned are the
    first ones, the next (or the flush after the last) was refused naming the close (or all
    returned), the warning's N counts no more than what returned since the last flush."""
    problems = []
    if spilled != set(args["ns"][: len(spilled)]):
        problems.append(f"the spills that returned are not the first {len(spilled)}: {sorted(spilled)[:10]}")
    if refused:
        _, n, kind, message = (refused[0] + ["", "", ""])[:4]
        with contextlib.suppress(ValueError):
            message = json.loads(message)
        # the spill after the last that returned, or the flush after it (``n`` "flush")
        next_one = n == str(len(spilled)) or (n == "flush" and len(spilled) == args["flush_after"])
        if len(refused) > 1 or not next_one or kind != "RuntimeError" or "closed" not in message:
            problems.append(f"the first refused call: {' '.join(refused[0])} (after {len(spilled)} spills returned)")
    elif written is None or spilled != set(args["ns"]):
        problems.append(f"the thread stopped after {len(spilled)} of {len(args['ns'])} spills, none refused")
    if len(warned) > 1 or any(w > unflushed for w in warned):
        problems.append(f"stderr said committing {warned}; {unflushed} spills returned since the last flush")
    return problems


def _check_late_exit(
    args: dict[str, Any], spilled: set[int], open_refused: list[list[str]], before: dict[str, Any] | None
) -> list[str]:
    """A thread opening the store for writing after the exit hook ran: refused, nothing created
    or changed."""
    problems = []
    path = Path(args["path"])
    if open_refused:
        _, kind, message = (open_refused[0] + ["", ""])[:3]
        with contextlib.suppress(ValueError):
            message = json.loads(message)
        if len(open_refused) > 1 or kind != "RuntimeError" or "the interpreter is exiting" not in message:
            problems.append(f"the late open raised: {' '.join(open_refused[0])}")
    else:
        problems.append("the late open was not refused")
    if spilled:
        problems.append(f"the late thread spilled {len(spilled)} trajectories")
    if before is None and os.path.lexists(path):
        problems.append(f"the late open created {path.name}: {sorted(_tree(path, []))[:5]}")
    elif before is not None and (after := _tree(path, [])) != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        problems.append(f"the late open changed the existing store: {changed[:5]}")
    return problems


def _check_exit_store(path: Path, codec: str, spilled: set[int] | None) -> tuple[set[int], list[str]]:
    """The trajectories committed at ``path`` and the problems a fresh reader finds: each reads
    exactly, `verify` is clean; where the exit was not promised (``spilled`` None) a writer's
    open and close must then sweep whatever it left."""
    problems: list[str] = []
    committed: set[int] = set()
    if not (path / "zarr.json").exists():
        return committed, ([] if spilled is None or not spilled else ["no store after the exit"])
    try:
        with SnapshotStore.open(path, mode="r") as store:
            ids = store.trajectories("r") if "r" in store.runs() else []
            committed = {n_of(tid) for tid in ids}
            for tid in ids:
                problems += _checked_trajectory(store, "r", tid, codec, campaign_fields(n_of(tid)))
            problems += [f"verify: {p.message}" for p in store.verify()]
        if spilled is None:
            problems += _reopen_for_writing(path)
    except StoreError as err:
        problems.append(f"the store after the exit raised {type(err).__name__}: {err}")
    return committed, problems


# -- fuzzing -------------------------------------------------------------------------------
FUZZ_GROUPS = ("root", "node", "array", "ids", "open")
FUZZ_MEMORY_LIMIT = 4 * 2**30  # RLIMIT_AS of the fuzzing process (TensorStore's threads reserve ~1 GiB)
# Once a child died on one of these (open arguments, or the root's chunk_tokens), reruns keep it below
# the bound, so the rest of its group still runs (both once aborted the process: docs/reliability.md).
BOUNDS = {"chunk_tokens": 2**12, "write_concurrency": 64}
ABSURD_INTS = (0, -1, 1, 7, 2**16, 2**31, 2**40, 2**53 + 1, 2**63, 2**64, -(2**63))
NASTY_STRINGS = (
    "",
    ".",
    "..",
    "../..",
    "../../../../tmp/vinekv-fuzz-escape",
    "/etc/passwd",
    "a/../b",
    "r/trajectories/..",
    "r/../r",
    "x\x00y",
    "\x00",
    "\n",
    "t000\n",
    "\x7f",
    "zarr.json",
    ".staging",
    "-x",
    "a" * 300,
    "\u202e",
    "é",
    "t000/..",
    "t000/",
    "./t000",
    " t000",
    "C:\\x",
    "~",
    "*",
    "%2e%2e",
)
RAW_PAYLOADS = (
    b"",
    b"{",
    b"[]",
    b"null",
    b"\xff\xfe{}",
    b"[" * 50_000 + b"]" * 50_000,
    b"1" * 5000,
    b'{"a":' * 2000 + b"1" + b"}" * 2000,
    b'{"zarr_format": 3, "node_type": "group", "attributes": {"vinekv": 1e999}}',
    b'{"zarr_format": 3, "node_type": "group", "attributes": {"vinekv": {"kind": NaN}}}',
    b"NaN",
)
# Exceptions an API call may raise: the store's own, and for bad arguments ValueError/TypeError
# (a KeyError only as MissingEntryError, a StoreError). OSError only for a path the caller gave.
ALLOWED = (StoreError, ValueError, TypeError, PermissionError, FileExistsError)


def _strategies() -> dict[str, Any]:
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.sampled_from(ABSURD_INTS),
        st.integers(-(10**6), 10**6),
        st.floats(),
        st.text(max_size=10),
        st.sampled_from(NASTY_STRINGS),
    )
    json_values = st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    )
    ids = st.one_of(
        st.sampled_from(NASTY_STRINGS + ("t000", "t001", "r", "q")),
        st.text(max_size=12),
        st.text(alphabet="./\x00\n\\ ~tr0", max_size=10),
        st.sampled_from((None, True, 2.5, b"t000", 0, -1, 2**70, ["t000"])),
    )
    return {"st": st, "json": json_values, "ids": ids, "scalars": scalars}


def _json_paths(value: Any, prefix: tuple = (), depth: int = 4) -> list[tuple]:
    """Every path (keys / list indices) into a JSON value, down to ``depth``."""
    paths = [prefix] if prefix else []
    if depth == 0:
        return paths
    if isinstance(value, dict):
        for k, v in value.items():
            paths += _json_paths(v, (*prefix, k), depth - 1)
    elif isinstance(value, list):
        for i in sorted({0, len(value) - 1} if value else set()):
            paths += _json_paths(value[i], (*prefix, i), depth - 1)
    return paths


def _set_path(root: Any, path: tuple, value: Any, drop: bool = False) -> Any:
    if not path:
        return value
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    if drop:
        parent.pop(path[-1]) if isinstance(parent, dict) else parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return root


def _reseal_node(node: Any) -> Any:
    """A group ``zarr.json`` whose ``attributes.vinekv`` is re-sealed (a digest that matches)."""
    with contextlib.suppress(Exception):  # not an object, or NaN (no canonical JSON): left as it is
        node["attributes"]["vinekv"] = seal(node["attributes"]["vinekv"])
    return node


def _dump(node: Any) -> bytes:
    return json.dumps(node, indent=1).encode()


def _tree(root: Path, exclude: Iterable[Path]) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file and folder under ``root`` except ``exclude`` subtrees."""
    skip = {str(p) for p in exclude}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if p not in skip:
                st = os.lstat(p)  # a folder's own mtime changes when the store in it is replaced
                out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns) if name in filenames else (-1, 0)
    return out


def _store_content(path: Path) -> dict[str, str]:
    """Digest of every file of a store but the writers' staging area."""
    return {
        str(p.relative_to(path)): hashlib.blake2b(p.read_bytes(), digest_size=8).hexdigest()
        for p in path.rglob("*")
        if p.is_file() and p.relative_to(path).parts[0] != ".staging"
    }


def _innermost_store_frame(err: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "/kvstore/" in f.filename]
    frame = frames[-1] if frames else (traceback.extract_tb(err.__traceback__) or [None])[-1]
    return f"{Path(frame.filename).name}:{frame.name}" if frame else "?"


class _FuzzRun:
    """Bookkeeping of one fuzz group in the child process."""

    def __init__(self, group: str, workdir: Path, bounded: frozenset[str]):
        self.group, self.workdir, self.bounded = group, workdir, bounded
        self.template = workdir / "template"
        self.sandbox = workdir / f"sandbox-{group}"
        self.store = self.sandbox / "store"
        self.stores = self.sandbox / "stores"
        self.sandbox.mkdir(parents=True, exist_ok=True)
        (self.sandbox / "sentinel.txt").write_text("nothing may touch this file")
        self.log = open(workdir / "logs" / f"{group}.log", "w")  # noqa: SIM115 (open for the run)
        self.examples = 0
        self.outcomes: Counter[str] = Counter()
        self.findings: dict[str, dict[str, Any]] = {}
        self.outside: list[str] = []
        self.last_error: BaseException | None = None
        self.unclear: dict[str, dict[str, Any]] = {}

    def fresh_store(self) -> Path:
        shutil.rmtree(self.store, ignore_errors=True)
        shutil.copytree(self.template, self.store)
        return self.store

    def attempt(self, op: str, case: Any, fn: Callable[..., Any], *args: Any, allow_os: bool = False) -> Any:
        self.last_error = None
        try:
            return fn(*args)
        except Exception as err:  # classified below
            self.last_error = err
            allowed = isinstance(err, ALLOWED) or (allow_os and isinstance(err, OSError))
            name = type(err).__name__
            self.outcomes[f"{op}:{'StoreError.' if isinstance(err, StoreError) else ''}{name}"] += 1
            if not allowed or (isinstance(err, KeyError) and not isinstance(err, MissingEntryError)):
                self.finding(op, case, err)
            elif not isinstance(err, StoreError) and self.group in ("root", "node", "array"):
                # allowed, but stored metadata is not an argument: a StoreError would name the file
                sample = self.unclear.setdefault(
                    f"{name}|{_innermost_store_frame(err)}", {"message": str(err)[:200], "case": repr(case)[:300]}
                )
                sample["count"] = sample.get("count", 0) + 1
            return None

    def finding(self, op: str, case: Any, err: BaseException | str) -> None:
        kind = type(err).__name__ if isinstance(err, BaseException) else "violation"
        where = _innermost_store_frame(err) if isinstance(err, BaseException) else op
        key = f"{self.group}|{kind}|{where}"
        entry = self.findings.setdefault(
            key,
            {"group": self.group, "op": op, "type": kind, "where": where, "message": str(err)[:300], "count": 0},
        )
        entry["count"] += 1
        entry.setdefault("case", repr(case)[:600])

    def run(self, case: Any, action: Callable[[Any], None], watch: Path) -> None:
        """Runs one example; ``watch`` is the folder the example may write in."""
        self.examples += 1
        self.log.write(repr(case)[:2000] + "\n")
        self.log.flush()
        roots = [self.workdir, self.workdir.parent]
        exclude = [watch, self.workdir / "logs"]
        before = [_tree(self.workdir, exclude), sorted(os.listdir(self.workdir.parent))]
        action(case)
        after = [_tree(self.workdir, exclude), sorted(os.listdir(self.workdir.parent))]
        if before != after:
            changed = sorted(set(before[0].items()) ^ set(after[0].items())) + sorted(set(before[1]) ^ set(after[1]))
            self.outside.append(f"{repr(case)[:300]}: {changed[:5]} in {roots}")
            self.finding("outside", case, f"wrote outside the store: {changed[:3]}")

    def exercise_read(self, case: Any) -> None:
        store = self.attempt("open_r", case, SnapshotStore.open, self.store, "r")
        if store is None:
            return
        runs = self.attempt("runs", case, store.runs) or []
        for run in runs[:3]:
            tids = self.attempt("trajectories", case, store.trajectories, run) or []
            self.attempt("size", case, store.size, run)
            for tid in tids[:3]:
                info = self.attempt("trajectory_info", case, store.trajectory_info, run, tid)
                self.attempt("token_ids", case, store.token_ids, run, tid)
                self.attempt("read_prefix_1", case, store.read_prefix, run, tid, 1)
                t = info.get("length") if isinstance(info, dict) else None
                if t is not None:
                    self.attempt("read_prefix_all", case, store.read_prefix, run, tid, t)
        self.attempt("close", case, store.close)

    def exercise_write(self, case: Any) -> None:
        store = self.attempt("open_r+", case, SnapshotStore.open, self.store, "r+")
        if store is None:
            return
        if "chunk_tokens" in self.bounded and _absurd_chunking(store.chunk_tokens):
            self.outcomes["skipped_write:bounded"] += 1
        else:
            n = 5
            fields = campaign_fields(n)
            self.attempt("spill", case, lambda: store.spill("w", tid_of(n), campaign_state(n), prompt_len(n), **fields))
            self.attempt("flush", case, store.flush)
        self.attempt("annotate", case, lambda: store.annotate("r", tid_of(1), mc_test={"x": 1}))
        self.attempt("close", case, store.close)

    def result(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "bounded": sorted(self.bounded),
            "examples": self.examples,
            "outcomes": dict(sorted(self.outcomes.items())),
            "findings": sorted(self.findings.values(), key=lambda f: -f["count"]),
            "outside_writes": self.outside[:20],
            "unclear_errors": self.unclear,
        }


def _absurd_chunking(chunk_tokens: Any) -> bool:
    return not isinstance(chunk_tokens, int) or chunk_tokens > BOUNDS["chunk_tokens"]


def _fuzz_root(fz: _FuzzRun, s: dict[str, Any]) -> tuple[Any, Callable[[Any], None]]:
    st = s["st"]
    root = json.loads((fz.template / "zarr.json").read_bytes())
    paths = _json_paths(root)
    case = st.one_of(
        st.tuples(st.just("raw"), st.sampled_from(RAW_PAYLOADS) | st.binary(max_size=300)),
        st.tuples(st.just("json"), s["json"]),
        st.tuples(st.just("set"), st.sampled_from(paths), s["json"], st.booleans()),
        st.tuples(st.just("drop"), st.sampled_from(paths), st.booleans()),
    )

    def action(c: Any) -> None:
        path = fz.fresh_store()
        if c[0] == "raw":
            data = c[1]
        elif c[0] == "json":
            data = json.dumps(c[1]).encode()
        else:
            node = _set_path(copy.deepcopy(root), c[1], c[2] if c[0] == "set" else None, drop=c[0] == "drop")
            data = _dump(_reseal_node(node) if c[-1] else node)
        (path / "zarr.json").write_bytes(data)
        fz.exercise_read(c)
        fz.exercise_write(c)

    return case, action


def _node_files(template: Path) -> list[str]:
    return [
        "runs/zarr.json",
        "runs/r/zarr.json",
        "runs/r/prompts/zarr.json",
        "runs/r/trajectories/zarr.json",
        "runs/r/trajectories/t001/zarr.json",
        next(str(p.relative_to(template)) for p in sorted((template / "runs/r/prompts").glob("*/zarr.json"))),
    ]


def _fuzz_node(fz: _FuzzRun, s: dict[str, Any]) -> tuple[Any, Callable[[Any], None]]:
    st = s["st"]
    targets = {rel: json.loads((fz.template / rel).read_bytes()) for rel in _node_files(fz.template)}
    choices = [(rel, p) for rel, node in targets.items() for p in _json_paths(node, depth=5)]
    values = st.one_of(s["json"], st.sampled_from(ABSURD_INTS), st.sampled_from(NASTY_STRINGS))
    case = st.one_of(
        st.tuples(st.just("set"), st.sampled_from(choices), values, st.booleans() | st.just(True)),
        st.tuples(st.just("drop"), st.sampled_from(choices), st.booleans() | st.just(True)),
        st.tuples(st.just("raw"), st.sampled_from(sorted(targets)), st.sampled_from(RAW_PAYLOADS)),
    )

    def action(c: Any) -> None:
        path = fz.fresh_store()
        if c[0] == "raw":
            (path / c[1]).write_bytes(c[2])
        else:
            rel, keys = c[1]
            node = _set_path(copy.deepcopy(targets[rel]), keys, c[2] if c[0] == "set" else None, drop=c[0] == "drop")
            (path / rel).write_bytes(_dump(_reseal_node(node) if c[-1] else node))
        fz.exercise_read(c)
        fz.exercise_write(c)

    return case, action


def _fuzz_array(fz: _FuzzRun, s: dict[str, Any]) -> tuple[Any, Callable[[Any], None]]:
    st = s["st"]
    prompt_node = _node_files(fz.template)[-1]
    nodes = {"runs/r/trajectories/t001/zarr.json": ("q", "scale"), prompt_node: ("q",)}
    targets = {}
    for node, arrays in nodes.items():
        for name in arrays:
            rel = str(Path(node).parent / name / "zarr.json")
            targets[rel] = (node, name, json.loads((fz.template / rel).read_bytes()))
    choices = [(rel, p) for rel, (_, _, meta) in targets.items() for p in _json_paths(meta, depth=6)]
    values = st.one_of(st.sampled_from(ABSURD_INTS), st.integers(-3, 300), s["json"])
    case = st.tuples(st.sampled_from(choices), values, st.booleans() | st.just(True))

    def action(c: Any) -> None:
        path = fz.fresh_store()
        (rel, keys), value, reseal = c
        node_rel, name, meta = targets[rel]
        meta = _set_path(copy.deepcopy(meta), keys, value)
        (path / rel).write_bytes(_dump(meta))
        if reseal:  # the node records the new metadata's digest: the values themselves get used
            node = json.loads((path / node_rel).read_bytes())
            with contextlib.suppress(ValueError):  # NaN: no digest
                node["attributes"]["vinekv"]["arrays"][name] = json_digest(meta)
            (path / node_rel).write_bytes(_dump(_reseal_node(node)))
        fz.exercise_read(c)

    return case, action


def _valid_name(name: Any) -> bool:
    try:  # the store's own id check: vinekv.kvstore.schema since the backends refactor, kvstore.store before
        from vinekv.kvstore.schema import check_name
    except ImportError:
        from vinekv.kvstore.store import _check_name as check_name

    try:
        check_name("id", name)
    except (TypeError, ValueError):
        return False
    return True


ID_OPS = ("spill", "info", "tokens", "read_prefix", "plan_read", "trajectories", "annotate", "delete_run", "size")


def _fuzz_ids(fz: _FuzzRun, s: dict[str, Any]) -> tuple[Any, Callable[[Any], None]]:
    st = s["st"]
    ts = st.one_of(st.sampled_from(ABSURD_INTS), st.integers(-3, 300), st.sampled_from((None, 2.5, True, "5")))
    case = st.tuples(
        st.sampled_from(ID_OPS), s["ids"], s["ids"], ts, st.text(max_size=8) | st.sampled_from(NASTY_STRINGS)
    )
    legit = {("r", tid_of(0)), ("r", tid_of(1))}

    def action(c: Any) -> None:
        op, run, tid, t, field = c
        path = fz.fresh_store()
        before = _store_content(path)
        store = fz.attempt("open_a", c, SnapshotStore.open, path, "a")
        if store is None:
            return
        calls: dict[str, tuple[Callable[..., Any], tuple]] = {
            "spill": (lambda *a: (store.spill(*a), store.flush()), (run, tid, campaign_state(2), prompt_len(2))),
            "info": (store.trajectory_info, (run, tid)),
            "tokens": (store.token_ids, (run, tid)),
            "read_prefix": (store.read_prefix, (run, tid, t)),
            "plan_read": (store.plan_read, (run, tid, t)),
            "trajectories": (store.trajectories, (run,)),
            "annotate": (lambda *a: store.annotate(*a, **{field: [1, "x"]}), (run, tid)),
            "delete_run": (store.delete_run, (run,)),
            "size": (store.size, (run,)),
        }
        fn, args = calls[op]
        got = fz.attempt(op, c, fn, *args)
        if isinstance(fz.last_error, IntegrityError):  # the store is intact: a bad id is not damage
            fz.finding(op, c, f"IntegrityError for an invalid id: {fz.last_error}")
        pair = (str(run), str(tid))
        if got is not None and op in ("info", "tokens", "read_prefix", "plan_read") and pair not in legit:
            fz.finding(op, c, f"{op} of an id that is not in the store returned data")
        fz.attempt("close", c, store.close)
        after = _store_content(path)
        changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
        valid = _valid_name(run) and (op in ("delete_run",) or _valid_name(tid))
        expected = op in ("spill", "annotate", "delete_run") and valid
        if changed and not expected:
            fz.finding(op, c, f"{op} with invalid ids changed the store: {sorted(changed)[:3]}")
        for key in sorted(changed):
            if expected and not key.startswith(f"runs/{run}/"):
                fz.finding(op, c, f"{op} of run {run!r} changed {key}")

    return case, action


OPEN_DEFAULTS = {
    "chunk_tokens": 64,
    "max_inflight_bytes": 2**24,
    "write_concurrency": 2,
    "durability": "trajectory",
    "cache_bytes": 2**20,
}


def _fuzz_open(fz: _FuzzRun, s: dict[str, Any]) -> tuple[Any, Callable[[Any], None]]:
    """Valid open arguments with one of them (or none) replaced by a hostile value."""
    st = s["st"]
    names = st.text(max_size=20).filter(lambda x: "/" not in x and x not in (".", ".."))
    codecs = st.one_of(
        st.sampled_from(("zip", "", "INT8")),
        st.fixed_dictionaries(
            {"name": st.sampled_from(("int8", "int4", "lossless"))},
            optional={"group_size": s["scalars"], "zstd_level": s["scalars"], "decode": s["scalars"]},
        ),
        s["json"],
    )
    ints = st.one_of(st.sampled_from(ABSURD_INTS), st.integers(-2, 300), s["scalars"])
    hostile = st.one_of(
        st.tuples(st.just("none"), st.none()),
        st.tuples(st.just("mode"), st.sampled_from(("w", "x", "", "R", None, 1))),
        st.tuples(st.just("codec"), codecs),
        st.tuples(st.sampled_from(sorted(OPEN_DEFAULTS)), ints),
        st.tuples(st.sampled_from(("chunk_tokens", "write_concurrency")), st.sampled_from(ABSURD_INTS)),
        st.tuples(st.just("durability"), st.sampled_from(("none", "", None, "Flush"))),
    )
    limits = {arg: BOUNDS[arg] for arg in fz.bounded}  # a child died on one of these: bound it
    if limits:
        hostile = hostile.filter(lambda h: h[0] not in limits or not isinstance(h[1], int) or h[1] <= limits[h[0]])
    case = st.tuples(
        names,
        st.sampled_from(("r", "r+", "a", "w-")),
        st.sampled_from(("int8", "int4", "lossless")),
        st.sampled_from(("trajectory", "flush")),
        st.booleans(),
        hostile,
    )

    def action(c: Any) -> None:
        name, mode, codec, durability, existing, (arg, value) = c
        fz.stores.mkdir(exist_ok=True)
        path = fz.stores / name if name else fz.stores / "default"
        if existing:
            with contextlib.suppress(OSError, ValueError):
                shutil.rmtree(path, ignore_errors=True)
                shutil.copytree(fz.template, path)
        kwargs = {**OPEN_DEFAULTS, "durability": durability}
        if arg == "mode":
            mode = value
        elif arg == "codec":
            codec = value
        elif arg != "none":
            kwargs[arg] = value
        store = fz.attempt("open", c, lambda: SnapshotStore.open(path, mode, codec, **kwargs), allow_os=True)
        if store is not None and mode != "r":
            n = 3
            spilled = fz.attempt(
                "spill", c, lambda: store.spill("x", tid_of(n), campaign_state(n), prompt_len(n)) or True
            )
            if spilled and fz.attempt("flush", c, lambda: store.flush() or True):
                got = fz.attempt("read", c, store.read_prefix, "x", tid_of(n), length(n))
                want = _encode_decode(store, n)
                if got is not None and np.stack([got.keys[:, 0], got.values[:, 0]], 1).tobytes() != want.tobytes():
                    fz.finding("read", c, "a spilled trajectory read back other KV")
                fz.outcomes["round_trip"] += got is not None
        if store is not None:
            fz.attempt("close", c, store.close)
        with contextlib.suppress(OSError, ValueError):
            shutil.rmtree(path, ignore_errors=True)

    return case, action


def _encode_decode(store: SnapshotStore, n: int) -> np.ndarray:
    state, plen = campaign_state(n), prompt_len(n)
    parts = []
    for lo, hi in ((0, plen), (plen, state.position)):
        codes = store.codec.encode(state.keys[:, 0, lo:hi], state.values[:, 0, lo:hi])
        parts.append(store.codec.decode({k: v.data for k, v in codes.items()}, LAYOUT.dtype, np.float32))
    return np.concatenate(parts, axis=2)


def _crash_argument(crash: dict[str, Any]) -> str | None:
    """The open argument (or root attribute) a fuzz child died on, if it is one of `BOUNDS`."""
    return next((arg for arg in BOUNDS if arg in crash["case"] and arg not in crash["bounded"]), None)


FUZZERS = {"root": _fuzz_root, "node": _fuzz_node, "array": _fuzz_array, "ids": _fuzz_ids, "open": _fuzz_open}


def _peak_rss_kib() -> int:
    """This process's peak resident memory since its exec, KiB (``VmHWM``: unlike ``ru_maxrss``,
    not inherited from the process that forked it, a test runner holding models)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def _fuzz_child(group: str, examples: int, seed: int, workdir: Path, bounded: frozenset[str]) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fix_seed

    fz = _FuzzRun(group, workdir, bounded)
    rss_start = _peak_rss_kib()
    strategy, action = FUZZERS[group](fz, _strategies())
    watch = fz.stores if group == "open" else fz.store

    @fix_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.generate,),
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def check(case: Any) -> None:
        fz.run(case, action, watch)

    start = time.monotonic()
    check()
    rss_end = _peak_rss_kib()
    return {
        **fz.result(),
        "seconds": round(time.monotonic() - start, 1),
        "maxrss_mb": round(rss_end / 1024),
        "maxrss_growth_mb": round((rss_end - rss_start) / 1024),
    }


def fuzz(
    workdir: str | Path,
    max_examples: int = 50,
    seed: int = 0,
    groups: Iterable[str] = FUZZ_GROUPS,
    memory_limit: int = FUZZ_MEMORY_LIMIT,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Runs each fuzz group in a child process limited to ``memory_limit`` bytes of address
    space. A child that dies (a C++ abort on an allocation, a segfault) is a finding: the case
    it was running is recorded and the group runs again, the argument it died on bounded
    (`BOUNDS`; all of them after a death of another cause)."""
    workdir = Path(workdir) / "fuzz"
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    if not (workdir / "template").exists():
        _build_store(workdir / "template", "int8", {"r": (0, 1)})
    out: dict[str, Any] = {"memory_limit_mb": memory_limit // 2**20, "groups": {}, "crashes": []}

    for group in groups:
        bounded: frozenset[str] = frozenset()
        for _ in range(len(BOUNDS) + 2):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--fuzz-child", group, "--fuzz-examples"]
            cmd += [str(max_examples), "--seed", str(seed), "--workdir", str(workdir), "--bounded", ",".join(bounded)]
            cmd += ["--memory-limit", str(memory_limit)]  # set by the child itself: no preexec_fn after a fork
            proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO)
            result_file = workdir / "logs" / f"{group}.json"
            if proc.returncode == 0:
                result = json.loads(result_file.read_text())
                out["groups"][group] = result
                log(
                    f"[fuzz {group}{' bounded ' + ','.join(sorted(bounded)) if bounded else ''}] "
                    f"{result['examples']} examples, "
                    f"{len(result['findings'])} findings, maxrss {result['maxrss_mb']} MiB, {result['seconds']} s"
                )
                break
            cases = (workdir / "logs" / f"{group}.log").read_text().splitlines()
            crash = {
                "group": group,
                "bounded": sorted(bounded),
                "returncode": proc.returncode,
                "case": cases[-1] if cases else "?",
                "examples_before": len(cases) - 1,
                "stderr": proc.stderr[-800:],
            }
            out["crashes"].append(crash)
            log(f"[fuzz {group}] child died (rc {proc.returncode}) on case {crash['case'][:200]}")
            arg = _crash_argument(crash)
            bounded = bounded | {arg} if arg else frozenset(BOUNDS)
    out["examples"] = sum(g["examples"] for g in out["groups"].values()) + sum(
        c["examples_before"] + 1 for c in out["crashes"]
    )
    out["findings"] = [f for g in out["groups"].values() for f in g["findings"]]
    out["outside_writes"] = [w for g in out["groups"].values() for w in g["outside_writes"]]
    out["maxrss_mb"] = max((g["maxrss_mb"] for g in out["groups"].values()), default=0)
    return out


def _machine() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "?")
    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorstore": version("tensorstore"),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs per operation")
    parser.add_argument("--ops", default=",".join(OPERATIONS), help="operations of the kill sweep")
    parser.add_argument("--mutations", type=int, default=4, help="mutations of each kind per file")
    parser.add_argument("--codecs", default="lossless,int8,int4", help="codecs of the corruption stores")
    parser.add_argument("--fuzz-examples", type=int, default=400, help="hypothesis examples per fuzz group")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="scratch folder (default: a new temporary one, removed at the end)")
    parser.add_argument("--out", help="JSON summary to write")
    parser.add_argument("--race-rounds", type=int, default=20, help="rounds of the deletion race sweep")
    parser.add_argument("--door-cases", type=int, default=600, help="bad inputs spilled by the door sweep")
    parser.add_argument("--exit-rounds", type=int, default=10, help="exits without close() per exit way")
    parser.add_argument("--skip", default="", help="parts to skip: kill,corruption,exchange,race,door,exit,fuzz")
    parser.add_argument("--fuzz-child", help=argparse.SUPPRESS)
    parser.add_argument("--bounded", default="", help=argparse.SUPPRESS)
    parser.add_argument("--memory-limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fuzz_child:  # one fuzz group, in the address-space-limited child
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
        workdir = Path(args.workdir)
        bounded = frozenset(filter(None, args.bounded.split(",")))
        result = _fuzz_child(args.fuzz_child, args.fuzz_examples, args.seed, workdir, bounded)
        (workdir / "logs" / f"{args.fuzz_child}.json").write_text(json.dumps(result, indent=1))
        return 0
    import tempfile

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vinekv-campaign-"))
    workdir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    summary: dict[str, Any] = {
        "command": "python tests/reliability_campaign.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    start = time.monotonic()
    if "kill" not in skip:
        summary["kill"] = {
            op: kill_sweep(op, args.kills, workdir, args.seed, log=log) for op in args.ops.split(",") if op
        }
    if "corruption" not in skip:
        codecs = tuple(args.codecs.split(","))
        summary["corruption"] = corruption_sweep(workdir, codecs, args.mutations, args.seed, log=log)
    if "exchange" not in skip:
        summary["exchange"] = exchange_sweep(workdir, tuple(args.codecs.split(",")), args.seed, log=log)
    if "race" not in skip:
        summary["race"] = delete_race_sweep(args.race_rounds, workdir, args.seed, log=log)
    if "door" not in skip:
        summary["door"] = door_sweep(args.door_cases, workdir, args.seed, log=log)
    if "exit" not in skip:
        summary["exit"] = exit_sweep(args.exit_rounds, workdir, args.seed, log=log)
    if "fuzz" not in skip:
        summary["fuzz"] = fuzz(workdir, args.fuzz_examples, args.seed, log=log)
    summary["seconds"] = round(time.monotonic() - start, 1)
    violations = sum(len(r["violations"]) for r in summary.get("kill", {}).values())
    violations += sum(len(summary.get(part, {}).get("violations", [])) for part in ("race", "door", "exit"))
    log(
        f"done in {summary['seconds']} s: {violations} kill/race/door/exit violations, "
        f"{sum(summary.get(p, {}).get('silent_wrong', 0) for p in ('corruption', 'exchange', 'door'))} silent wrong, "
        f"{len(summary.get('fuzz', {}).get('findings', []))} "
        f"fuzz findings, {len(summary.get('fuzz', {}).get('crashes', []))} fuzz crashes"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
