"""Shared pieces of the replay tests: a stored run of three trajectories with known steps, copies of
it to replay into, its MC records, and reward functions (importable by Ray workers as
``replay_kit:NAME`` with this folder on their PYTHONPATH)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from vinekv.kvstore import SnapshotStore, capture_state

PROMPT = b"Q: 2+3?\n"
RESPONSES = [b"2+3\n=5\nA: 5", b"think\nA: 6", b"A: 5"]
RUN = "r0"


def spill_run(model, path: Path) -> tuple[list[np.ndarray], list]:
    """Run ``r0`` of trajectories ``t0..t2`` (PROMPT + each response, field ``answer="5"``) spilled
    losslessly into a new store at ``path``; returns their ``[1, T]`` token ids and full states."""
    seqs = [np.frombuffer(PROMPT + r, dtype=np.uint8).astype(np.int32)[None] for r in RESPONSES]
    states = [capture_state(model, s, s.shape[1]) for s in seqs]
    with SnapshotStore.open(path, codec="lossless") as store:
        for i, state in enumerate(states):
            store.spill(RUN, f"t{i}", state, len(PROMPT), answer="5")
    return seqs, states


def copies(path: Path, folder: Path, *names: str) -> list[Path]:
    """Fresh copies of the store at ``path`` in ``folder``, one per name, to replay into."""
    for name in names:
        shutil.copytree(path, folder / name)
    return [folder / name for name in names]


def mc_records(store) -> dict:
    """``fields["mc"]`` of every trajectory of run r0, by id."""
    return {tid: store.trajectory_info(RUN, tid)["fields"]["mc"] for tid in store.trajectories(RUN)}


def answer_reward(prompts, completions, answer, **kwargs):
    """Half for ending with the stored answer, half the fraction of even bytes: values strictly
    between 0 and 1, so comparisons of resumed and fresh values compare something."""
    return [
        0.5 * c.rstrip().endswith(a) + 0.5 * sum(b % 2 == 0 for b in c.encode()) / max(1, len(c.encode()))
        for c, a in zip(completions, answer, strict=True)
    ]


_SCORED: list[str] = []  # trajectories this process has scored


def dying_reward(prompts, completions, trajectory, **fields):
    """`answer_reward` that appends ``"<pid> <trajectory>"`` to ``$VINEKV_HOOKS/calls`` per call
    (``trajectory``: a stored field naming it), and kills the first process, of all, that starts
    its second trajectory: a worker lost in the middle of a trajectory after finishing one."""
    folder = Path(os.environ["VINEKV_HOOKS"])
    _SCORED.append(trajectory[0])
    with open(folder / "calls", "a") as calls:
        calls.write(f"{os.getpid()} {trajectory[0]}\n")
    if len(_SCORED) == 2:
        try:
            (folder / "killed").touch(exist_ok=False)
        except FileExistsError:
            pass
        else:
            os._exit(1)
    return answer_reward(prompts, completions, **fields)


def always_dying_reward(prompts, completions, **fields):
    """A reward whose every call kills its process: a worker that dies whatever it values."""
    os._exit(1)
