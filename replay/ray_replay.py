"""Branch replay of a stored run on Ray actors: `replay_run` over a work queue of trajectory ids.

Each worker (a Ray actor) builds the policy and the reward function from their spec strings
(models cannot be shipped to actors) with the loaders the job names (default: the CLI's,
`vinekv.specs.load_model` / `load_reward`), opens the store itself and values the
trajectory ids the driver hands it with `replay_run`, which writes each trajectory's values back
with one atomic commit as soon as they are sampled. The driver keeps the queue: an idle worker
gets the next ids, so a slow worker holds nobody back. A worker that dies (process killed, node
lost) loses only the trajectories it had not finished: Ray restarts the actor (``max_restarts``)
and runs its call again (``max_task_retries``); what the dead process had written is skipped as
settled. Each call returns the worker's process id, so the driver sees which calls ran again.
Branch keys depend on (seed, the state's tokens, branch index) only (`state_key`), so the values
equal a single process's for any number of workers and any retries.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib
import logging
import math
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from vinekv.kvstore.process import enable_compilation_cache, quiet_logs
from vinekv.kvstore.store import SnapshotStore
from vinekv.replay.branch_replay import ReplayConfig, ReplayReport, replay_run
from vinekv.replay.engines import ESurgeOptions, open_engine

logger = logging.getLogger(__name__)

# Driver variables the workers get: log levels, the JAX platform and compilation cache, the
# warm-up cache, and object-store credentials (values never logged).
FORWARDED_ENV = ("TF_CPP_MIN_LOG_LEVEL", "LOGGING_LEVEL_ED", "JAX_PLATFORMS", "VINEKV_JAX_CACHE", "VINEKV_CACHE")
FORWARDED_PREFIXES = ("AWS_", "GOOGLE_")
# Seconds to reach an explicit cluster address before Ray is asked (Ray retries for minutes).
CONNECT_TIMEOUT_S = 5.0
# What builds a worker's policy and reward from their specs (imported by name in the worker).
DEFAULT_MODEL_LOADER = "vinekv.specs:load_model"
DEFAULT_REWARD_LOADER = "vinekv.specs:load_reward"


class ReplayWorkerError(RuntimeError):
    """A replay worker could not start (bad spec or store), or trajectories outlived their retries."""


@dataclasses.dataclass(frozen=True)
class WorkerJob:
    """What every worker of one distributed replay gets: where the run is, the policy and reward
    specs, the ``module:function`` loaders that build them from their specs, and the
    `replay_run` settings."""

    store: str | dict[str, Any]
    run: str
    model_spec: str
    reward_spec: str
    config: ReplayConfig
    allow_stale: bool = False
    keep_stale_values: bool = False
    esurge_options: ESurgeOptions | None = None
    model_loader: str = DEFAULT_MODEL_LOADER
    reward_loader: str = DEFAULT_REWARD_LOADER


def load_object(spec: str) -> Any:
    """``package.module:attribute`` -> the attribute; ``ValueError`` naming the spec when the
    module does not import or lacks the attribute (an error inside the module is raised as is)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"expected 'package.module:attribute', got {spec!r}")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            raise  # the module exists; something it imports does not
        raise ValueError(f"{spec!r}: no module named {err.name!r} (is it on PYTHONPATH?)") from None
    try:
        return getattr(loaded, attr)
    except AttributeError:
        raise ValueError(f"{spec!r}: module {module!r} has no attribute {attr!r}") from None


@dataclasses.dataclass
class RayReplayReport(ReplayReport):
    """A `ReplayReport` summed over the workers (``seconds`` summed too); ``workers``: worker
    processes started (Ray's restarts of dead ones included); ``retried``: one trajectory id per
    call Ray ran again after its worker died; ``wall_seconds``: the driver's time from start to
    the last result."""

    workers: int = 0
    retried: list[str] = dataclasses.field(default_factory=list)
    wall_seconds: float = 0.0


class ReplayWorker:
    """The body of a Ray replay actor: the job's policy, reward, store and branch engine, loaded
    once; `value` runs `replay_run` on the ids it is given."""

    def __init__(self, job: WorkerJob) -> None:
        enable_compilation_cache()
        quiet_logs()
        logging.getLogger("vinekv.replay").setLevel(logging.WARNING)  # no INFO line per worker (engine choice)
        # per-call warnings (stale values, truncated branches) are logged once by the driver
        logging.getLogger("vinekv.replay.branch_replay").setLevel(logging.ERROR)
        self.job = job
        self.reward = load_object(job.reward_loader)(job.reward_spec)
        self.model, self.tokenizer = load_object(job.model_loader)(job.model_spec)
        self.store = SnapshotStore.open(job.store, mode="r+")
        config = job.config
        self.engine = open_engine(
            config.engine,
            self.model,
            tokenizer=self.tokenizer,
            max_rows=config.max_rows,
            esurge_options=job.esurge_options,
        )

    def ready(self) -> int:
        """The worker's process id, once it has loaded everything."""
        return os.getpid()

    def value(self, ids: list[str]) -> tuple[ReplayReport, list[str], int]:
        """`replay_run` of these trajectory ids: its report, its JSON metrics lines and the
        worker's process id (another than `ready`'s: Ray restarted the worker and ran it again)."""
        job = self.job
        with tempfile.TemporaryDirectory(prefix="vinekv-ray-") as folder:
            metrics = Path(folder) / "metrics.jsonl"
            report = replay_run(
                self.store,
                job.run,
                self.model,
                self.tokenizer,
                self.reward,
                job.config,
                trajectories=ids,
                metrics_path=metrics,
                progress=False,
                allow_stale=job.allow_stale,
                keep_stale_values=job.keep_stale_values,
                engine=self.engine,
            )
            return report, metrics.read_text().splitlines(), os.getpid()

    def close(self) -> None:
        self.engine.close()
        self.store.close()


def replay_run_ray(
    store: str | Path | dict[str, Any],
    run: str,
    model_spec: str,
    reward_spec: str,
    config: ReplayConfig | None = None,
    *,
    trajectories: Sequence[str] | None = None,
    num_workers: int = 2,
    address: str | None = None,
    batch_size: int = 1,
    max_retries: int = 2,
    worker_options: Mapping[str, Any] | None = None,
    worker_env: Mapping[str, str] | None = None,
    metrics_path: str | Path | None = None,
    progress: bool = True,
    allow_stale: bool = False,
    keep_stale_values: bool = False,
    esurge_options: ESurgeOptions | None = None,
    model_loader: str = DEFAULT_MODEL_LOADER,
    reward_loader: str = DEFAULT_REWARD_LOADER,
) -> RayReplayReport:
    """`replay_run` of ``run``'s trajectories (default: all) on ``num_workers`` Ray actors.

    Args:
      store: the store every worker opens: a path (made absolute here; on a cluster it must be
        the same path on every node, e.g. a shared file system) or a TensorStore URL/spec.
      model_spec, reward_spec: the policy and reward function as `vinekv replay --model/--reward`
        take them; each worker loads them once, with ``model_loader`` / ``reward_loader``
        (``module:function`` names, default `vinekv.specs.load_model` / `load_reward`).
      address: a running cluster (``host:port``, ``auto``, ``ray://host:port``); None or
        ``"local"``: a new local Ray instance with CPUs for the workers, shut down after. An
        already initialised Ray (``ray.init`` in this process) is used as it is.
      batch_size: trajectory ids per call to a worker.
      max_retries: times Ray runs a call again after its worker died (Ray's ``max_task_retries``;
        the worker itself is restarted every time).
      worker_options: Ray actor options of a worker (default ``{"num_cpus": 1}``; e.g.
        ``{"num_gpus": 1}`` on accelerators: a worker without a GPU resource sees no GPU).
      worker_env: environment variables of the workers besides `FORWARDED_ENV` and the
        ``AWS_*``/``GOOGLE_*`` credentials, which are taken from this process.
      metrics_path: the workers' `replay_run` metrics, one JSON line per trajectory, appended here.
      Others: as `replay_run`.

    Returns the merged `RayReplayReport`. Raises `ReplayWorkerError` when a worker cannot load
    the specs or the store, or a call's worker died more than ``max_retries`` times;
    ConnectionError when ``address`` is unreachable; errors raised by `replay_run` in a worker
    (e.g. `StalePolicyError`) as they are.
    """
    for name, value, least in (
        ("num_workers", num_workers, 1),
        ("batch_size", batch_size, 1),
        ("max_retries", max_retries, 0),
    ):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    config = config or ReplayConfig()
    store = _shared_location(store)
    with SnapshotStore.open(store, mode="r") as reader:
        ids = list(trajectories) if trajectories is not None else reader.trajectories(run)
    job = WorkerJob(
        store, run, model_spec, reward_spec, config, allow_stale, keep_stale_values, esurge_options, model_loader,
        reward_loader,
    )  # fmt: skip
    options = {"num_cpus": 1, **(worker_options or {})}
    env = {**forwarded_env(), **(worker_env or {})}
    report = RayReplayReport()
    start = time.perf_counter()
    with ray_connection(address, num_cpus=math.ceil(num_workers * options["num_cpus"])):
        workers = _Workers(job, options, env, max_retries)
        try:
            _drive(workers, ids, num_workers, batch_size, report, metrics_path, progress)
            workers.close()
        finally:
            workers.kill()
    report.wall_seconds = time.perf_counter() - start
    report.warn_if_mostly_truncated(config)
    if report.stale:
        logger.warning(
            "%d trajectories of run %r held MC values sampled by another policy than %s: valued again from scratch",
            report.stale,
            run,
            model_spec,
        )
    return report


def forwarded_env() -> dict[str, str]:
    """This process's variables that the workers get (`FORWARDED_ENV`, ``AWS_*``, ``GOOGLE_*``)."""
    return {k: v for k, v in os.environ.items() if k in FORWARDED_ENV or k.startswith(FORWARDED_PREFIXES)}


@contextlib.contextmanager
def ray_connection(address: str | None, num_cpus: int) -> Iterator[None]:
    """Ray for a replay: the caller's when initialised, else a new connection to ``address`` or
    a new local instance with ``num_cpus`` CPUs (address None or ``"local"``, no dashboard);
    one made here is shut down on exit. An explicit ``host:port`` that accepts no TCP connection
    within `CONNECT_TIMEOUT_S` is a ConnectionError naming it (Ray itself retries for minutes)."""
    import ray

    local = address in (None, "local")
    if not local:
        check_reachable(address)
    if ray.is_initialized():
        yield
        return
    try:
        with warnings.catch_warnings():
            # Ray's notice that it may stop hiding GPUs from workers asking for none, and JAX's
            # warning on the fork of Ray's process launches (each execs at once: nothing is shared)
            warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            if local:
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, TimeoutError) as err:
        raise ConnectionError(f"cannot connect to the Ray cluster at {address or 'local'!r}: {err}") from err
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """ConnectionError unless the ``host:port`` of ``address`` (``ray://`` stripped) accepts a TCP
    connection; addresses without a port (``auto``) are left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConnectionError(f"no Ray cluster at {address!r}: cannot connect to {host}:{port} ({err})") from err


class _Workers:
    """The driver's view of the actors: starting ones (by their `ready` call), idle ones and busy
    ones (by their `value` call, with the ids it values). Ray restarts a worker that dies, as
    often as needed, and runs its call again up to ``max_retries`` times."""

    def __init__(self, job: WorkerJob, options: Mapping[str, Any], env: Mapping[str, str], max_retries: int) -> None:
        import ray

        self.job = job
        self.max_retries = max_retries
        self.actor_class = ray.remote(ReplayWorker).options(
            **options, max_restarts=-1, max_task_retries=max_retries, runtime_env={"env_vars": dict(env)}
        )
        self.starting: dict[Any, Any] = {}
        self.idle: list[Any] = []
        self.busy: dict[Any, tuple[Any, list[str]]] = {}
        self.pids: dict[Any, int] = {}
        self.started = 0

    def start(self) -> None:
        actor = self.actor_class.remote(self.job)
        self.starting[actor.ready.remote()] = actor
        self.started += 1

    def submit(self, ids: list[str]) -> None:
        actor = self.idle.pop()
        self.busy[actor.value.remote(ids)] = (actor, ids)

    def next_done(self) -> Any:
        """The first finished `ready` or `value` call."""
        import ray

        done, _ = ray.wait([*self.busy, *self.starting], num_returns=1)
        return done[0]

    def started_up(self, ref: Any) -> None:
        """Moves a worker whose `ready` call returned to the idle ones, or raises why it could not start."""
        import ray

        actor = self.starting.pop(ref)
        try:
            self.pids[actor] = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            job = self.job
            raise ReplayWorkerError(
                f"a replay worker could not start (model {job.model_spec!r}, reward {job.reward_spec!r}, "
                f"store {job.store!r}): {_last_line(err)}"
            ) from err
        self.idle.append(actor)

    def restarted(self, actor: Any, pid: int, batch: list[str], report: RayReplayReport) -> None:
        """Notes a result from process ``pid``: another process than the worker's last means Ray
        restarted the worker while it valued ``batch`` and ran the call again."""
        if pid == self.pids[actor]:
            return
        logger.warning(
            "replay worker (pid %s) died while valuing %s; Ray restarted it (pid %s) and valued them again",
            self.pids[actor],
            batch,
            pid,
        )
        self.pids[actor] = pid
        self.started += 1
        report.retried.extend(batch)

    def out_of_retries(self, batch: list[str], err: Exception) -> ReplayWorkerError:
        return ReplayWorkerError(
            f"trajectories {batch}: their worker died {self.max_retries + 1} times "
            f"(max_retries={self.max_retries}); last: {_last_line(err)}"
        )

    def close(self) -> None:
        import ray

        ray.get([actor.close.remote() for actor in self.idle])

    def kill(self) -> None:
        import ray

        for actor in [*self.idle, *self.starting.values(), *(a for a, _ in self.busy.values())]:
            ray.kill(actor, no_restart=True)


def _drive(
    workers: _Workers,
    ids: list[str],
    num_workers: int,
    batch_size: int,
    report: RayReplayReport,
    metrics_path: str | Path | None,
    progress: bool,
) -> None:
    """Hands ``ids`` out to idle workers ``batch_size`` at a time until every one is valued;
    merges the results into ``report``."""
    import ray

    queue = collections.deque(ids)
    for _ in range(min(num_workers, len(ids))):
        workers.start()
    bar = tqdm(total=len(ids), desc=f"replay {workers.job.run} on Ray", unit="traj", disable=not progress)
    metrics = open(metrics_path, "a") if metrics_path else None  # noqa: SIM115
    try:
        while queue or workers.busy:
            while queue and workers.idle:
                workers.submit([queue.popleft() for _ in range(min(batch_size, len(queue)))])
            ref = workers.next_done()
            if ref in workers.starting:
                workers.started_up(ref)
                continue
            actor, batch = workers.busy.pop(ref)
            try:
                result, lines, pid = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                raise workers.out_of_retries(batch, err) from err
            except ray.exceptions.RayTaskError as err:  # replay_run's own error, raised as it is
                if err.cause is None:
                    raise
                raise err.cause from err
            workers.restarted(actor, pid, batch, report)
            workers.idle.append(actor)
            report.merge(result)
            if metrics:
                metrics.writelines(line + "\n" for line in lines)
                metrics.flush()
            bar.update(len(batch))
            bar.set_postfix(states=report.states, branches=report.branches, retried=len(report.retried))
    finally:
        bar.close()
        if metrics:
            metrics.close()
    report.workers = workers.started


def _last_line(err: Exception) -> str:
    """The last non-empty line of an error's message (for a failed actor: the remote exception)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _shared_location(store: str | Path | dict[str, Any]) -> str | dict[str, Any]:
    """A store location every worker resolves alike: a local path made absolute, URLs and specs as given."""
    if isinstance(store, dict) or "://" in str(store):
        return store
    return str(Path(store).expanduser().resolve())
