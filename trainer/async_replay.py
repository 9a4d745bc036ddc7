"""Asynchronous branch replay: a worker process values stored runs while the trainer goes on.

The trainer spills a batch's rollouts to the snapshot store and sends the worker the run's name
with the parameters of the policy that sampled it; the worker rebuilds that policy (same module
class and config, those parameters: its `policy_fingerprint` must equal the rollouts', or
`replay_run` refuses the snapshots) and runs `vinekv.replay.branch_replay.replay_run`, which writes
the MC values into the store. Branch keys depend on the seed, trajectory and state only, so the
values equal those the trainer would compute itself.

Jobs are served in the order they are sent; `ReplayWorker.result` returns the oldest one's
`ReplayReport`. Parameters travel through a pipe as numpy arrays (one host copy per batch).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from vinekv.replay.branch_replay import ReplayConfig, ReplayReport

Params = dict[str, Any]  # nnx.Param state of a module as a nested dict of numpy arrays


@dataclasses.dataclass(frozen=True)
class PolicyBlueprint:
    """What rebuilds an EasyDeL module in another process: its class, its config (as a dict:
    the config object holds the device mesh) and its dtypes."""

    module_class: type
    config_class: type
    config: dict[str, Any]
    dtype: Any
    param_dtype: Any
    precision: Any

    @classmethod
    def of(cls, model: Any) -> PolicyBlueprint:
        config = model.config
        return cls(type(model), type(config), config.to_dict(), model.dtype, model.param_dtype, model.precision)

    def build(self) -> Any:
        """A module of this blueprint with placeholder parameters (`load_params` fills them)."""
        return self.module_class(
            config=self.config_class.from_dict(self.config),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            rngs=nnx.Rngs(0),
        )


def policy_params(model: Any) -> Params:
    """A host copy of ``model``'s parameters."""
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


def load_params(model: Any, params: Params) -> None:
    """Sets ``model``'s parameters to ``params`` (from `policy_params` of a model of its blueprint)."""
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(params)
    nnx.update(model, state)


@dataclasses.dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs besides its jobs; must pickle (reward functions and the step
    splitter as module-level functions)."""

    store: str
    blueprint: PolicyBlueprint
    tokenizer: Any
    reward_fns: Sequence[Any]
    reward_weights: Sequence[float]
    splitter: Any = None
    esurge_options: Any = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # set in the worker before JAX starts

    def check_picklable(self) -> None:
        """ValueError naming the part that cannot be sent to a worker process."""
        for name in ("blueprint", "tokenizer", "reward_fns", "splitter", "esurge_options"):
            try:
                pickle.dumps(getattr(self, name))
            except Exception as err:  # pickling raises many kinds
                raise ValueError(
                    f"vineppo_async_replay sends the {name.replace('_', ' ')} to a worker process, but it does not "
                    f"pickle ({type(err).__name__}: {err}); use module-level functions"
                ) from None


class ReplayWorker:
    """A worker process that values stored runs (`replay_run`) with the parameters it is sent."""

    def __init__(self, setup: WorkerSetup):
        setup.check_picklable()
        context = multiprocessing.get_context("spawn")  # JAX and fork do not mix
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, setup), daemon=True, name="vinekv-replay")
        self._process.start()
        child.close()
        self.pending = 0

    def submit(self, run: str, model: Any, config: ReplayConfig) -> None:
        """Queues the valuation of ``run`` with ``model``'s current parameters."""
        self._conn.send((run, policy_params(model), config))
        self.pending += 1

    def result(self, run: str) -> ReplayReport:
        """The `ReplayReport` of ``run`` (the oldest queued), once its values are in the store;
        RuntimeError with the worker's traceback if it failed or died."""
        if not self.pending:
            raise RuntimeError("no replay job is queued")
        try:
            done, status, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the replay worker died (exit code {self._process.exitcode})") from None
        self.pending -= 1
        if done != run:
            raise RuntimeError(f"the replay worker answered for run {done!r}, run {run!r} was expected")
        if status != "ok":
            raise RuntimeError(f"the replay worker failed on run {run!r}:\n{payload}")
        return payload

    def close(self) -> None:
        """Stops the worker; jobs still queued are dropped."""
        if self._process.is_alive():
            if self.pending:
                self._process.terminate()
            else:
                self._conn.send(None)
            self._process.join(timeout=30)
            if self._process.is_alive():
                self._process.kill()
        self._conn.close()


def _serve(conn: Any, setup: WorkerSetup) -> None:
    """The worker's loop: ``(run, params, config)`` jobs until ``None``."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `close` mid-job: exit through cleanup
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # a GPU the trainer uses too
    os.environ.update(setup.env)
    from vinekv.kvstore import SnapshotStore
    from vinekv.replay.branch_replay import replay_run
    from vinekv.replay.engines import open_engine
    from vinekv.replay.rewards import weighted_sum

    model = setup.blueprint.build()
    reward = weighted_sum(setup.reward_fns, setup.reward_weights)
    engine = None
    with SnapshotStore.open(setup.store, mode="r+") as store:
        while (job := conn.recv()) is not None:
            run, params, config = job
            try:
                load_params(model, params)
                if engine is None:
                    engine = open_engine(  # as the trainer opens its own
                        config.engine, model, tokenizer=setup.tokenizer, esurge_options=setup.esurge_options
                    )
                else:
                    engine.update_model(model)
                report = replay_run(
                    store,
                    run,
                    model,
                    setup.tokenizer,
                    reward,
                    config,
                    splitter=setup.splitter,
                    progress=False,
                    engine=engine,
                )
                conn.send((run, "ok", report))
            except Exception:  # the trainer raises it with this traceback
                conn.send((run, "error", traceback.format_exc()))
    if engine is not None:
        engine.close()
