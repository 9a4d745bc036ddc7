"""Every use of eSurge's private internals, in one place (EasyDeL has no public KV import/export).

Written against easydel 0.3.0. `require` checks that each internal this module touches exists
and otherwise raises `ESurgeUnavailable` naming the installed EasyDeL version and the missing
piece; nothing else in vinekv reaches into eSurge.

What is used, and why:
- the page pool (``scheduler.kv_cache_manager.page_pool``): allocate pages for a snapshot, give
  them the prefix-cache hashes of its tokens, hold a reference while its branches run;
- the KV page arrays (``runner.executor_manager.kv_pages``): per layer
  ``[num_pages, page_size, kv_groups, packing, head_dim_storage]``, which flattens to
  ``[num_pages, page_size, 2 * kv_heads, head_dim_storage]`` with K of head h at ``2h``, V at
  ``2h + 1`` and the head dim zero-padded (to 128 on CPU);
- the scheduler/runner step (``schedule``, ``execute_model``, ``update_from_output``): driven
  synchronously from the caller's thread, so a batch is scheduled the same way every time;
- the page-freeing step (``scheduler._free_pages``): the one moment a finished request's page
  ids and ``num_computed_tokens`` are still valid, wrapped to read its KV out;
- ``core.utils.none_hash`` and the ``hash`` the page-caching modules call: pinned so a page's
  prefix-cache key is the same in every process (`pin_page_hashes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vinekv.kvstore.dense_cache import kv_layout

TESTED_EASYDEL = "0.3.0"
# Seed of eSurge's page-hash chain. eSurge draws it from os.urandom unless PYTHONHASHSEED is set.
PAGE_HASH_SEED = 0x76696E656B76  # "vinekv"
# The modules that hash pages with the builtin ``hash``: on Python < 3.12 ``hash(None)`` (part of
# every page's key) is the object's address, so a page's hash differed between processes even
# with the seed pinned. `pin_page_hashes` gives them `page_content_hash` instead.
_PAGE_HASHING_MODULES = ("easydel.inference.esurge.core.manager", "easydel.inference.esurge.core.page_pool")


def page_content_hash(key: tuple) -> int:
    """A process-independent hash of a page key ``(parent hash, token ids, extra keys)``: the
    first 8 bytes of the BLAKE2b digest of its ``repr`` (ints, tuples, strings, None)."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little", signed=True)


def pin_page_hashes() -> None:
    """Makes eSurge's prefix-cache page hashes the same in every process: the chain's seed is
    `PAGE_HASH_SEED` and pages are hashed with `page_content_hash`."""
    importlib.import_module("easydel.inference.esurge.core.utils").none_hash = PAGE_HASH_SEED
    for name in _PAGE_HASHING_MODULES:
        importlib.import_module(name).hash = page_content_hash


class ESurgeUnavailable(RuntimeError):
    """eSurge cannot serve vinekv here (missing internal, unsupported model, failed start)."""


def easydel_version() -> str:
    return importlib.metadata.version("easydel")


def _internal(path: str) -> Any:
    module, _, attr = path.rpartition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ESurgeUnavailable(
            f"vinekv's eSurge engine needs the EasyDeL internal {path}, which easydel {easydel_version()} "
            f"does not have (vinekv was written against easydel {TESTED_EASYDEL}); use engine='vanilla'"
        ) from err
    return obj


_REQUIRED = (
    "easydel.inference.esurge:eSurge",
    "easydel.inference.esurge.request:EngineRequest",
    "easydel.inference.esurge.core.utils:hash_page_tokens",
    "easydel.inference.esurge.core.utils:PageHashWithGroupId",
    "easydel.inference.esurge.core.utils:init_none_hash",
    "easydel.inference.esurge.core.page_pool:PagePool.get_new_pages",
    "easydel.inference.esurge.core.page_pool:PagePool.free_pages",
    "easydel.inference.esurge.scheduler.scheduler:Scheduler._free_pages",
    "easydel.inference.esurge.scheduler.scheduler:Scheduler.update_from_output",
    "easydel.inference.esurge.runners.model_runner:eSurgeRunner.execute_model",
    "easydel.caching.ragged_page.cache:per_device_hbm_budget_bytes",
)


def require() -> None:
    """Raises `ESurgeUnavailable` unless every module-level internal this module uses is present
    (the instance-level ones are checked on each engine by `start`)."""
    for path in _REQUIRED:
        _internal(path)


_INSTANCE = (
    "scheduler.kv_cache_manager.page_pool.cached_page_hash_to_page",
    "scheduler.kv_cache_manager.get_page_ids",
    "runner.executor_manager.kv_pages",
    "runner.executor_manager.rng_key",
    "runner.metadata.page_size",
    "_worker_manager",
    "_scheduler_thread",
)


def _check_instance(engine: Any) -> None:
    for path in _INSTANCE:
        obj = engine
        for part in path.split("."):
            if not hasattr(obj, part):
                raise ESurgeUnavailable(
                    f"vinekv's eSurge engine needs eSurge.{path}, which easydel {easydel_version()} does not have "
                    f"(vinekv was written against easydel {TESTED_EASYDEL}); use engine='vanilla'"
                )
            obj = getattr(obj, part)


@dataclasses.dataclass
class Finished:
    """One finished request: its sampled tokens, why it ended, and how many prompt tokens
    came from the prefix cache instead of being prefilled."""

    tokens: list[int]
    finish_reason: str
    cached_tokens: int


@contextlib.contextmanager
def _page_budget(budget_bytes: int | None) -> Iterator[None]:
    """eSurge sizes its page pool from free device memory; a CPU reports none and eSurge falls
    back to 4 GiB. With ``budget_bytes`` the pool gets exactly that budget while it is built."""
    if budget_bytes is None:
        yield
        return
    module = importlib.import_module("easydel.caching.ragged_page.cache")
    original = module.per_device_hbm_budget_bytes
    module.per_device_hbm_budget_bytes = lambda *args, **kwargs: int(budget_bytes)
    try:
        yield
    finally:
        module.per_device_hbm_budget_bytes = original


def paged_model(model: Any) -> Any:
    """``model``'s paged-attention twin for eSurge, sharing its weights and its RoPE table.

    EasyDeL caches the RoPE table in the base module as an ``nnx`` variable on the first forward
    (vinekv's `set_rope_table_dtype` puts a float32 one there); easydel 0.3.0's
    ``esurge_compatible_model`` rebuilds the graph from the config without it and fails
    ("Incorrect number of leaves"). The table is set aside while the twin is built, then given
    to the twin too, so both engines rotate with the same table."""
    from easydel.infra.base_module import EasyDeLBaseModule
    from flax import nnx

    tables = {
        path: vars(node).pop("frequencies")
        for path, node in list(nnx.iter_graph(model))
        if isinstance(node, EasyDeLBaseModule) and "frequencies" in vars(node)
    }
    try:
        twin = model.esurge_compatible_model
    finally:
        nodes = dict(nnx.iter_graph(model))
        for path, table in tables.items():
            vars(nodes[path])["frequencies"] = table
    if twin is not model:
        twin_nodes = dict(nnx.iter_graph(twin))
        for path, table in tables.items():
            vars(twin_nodes[path])["frequencies"] = table
    return twin


def start(
    model: Any,
    tokenizer_path: str,
    *,
    page_size: int,
    page_budget_bytes: int | None,
    max_model_len: int,
    max_num_seqs: int,
    prefix_caching: bool = True,
) -> Any:
    """An eSurge engine over ``model`` (prefix caching on unless ``prefix_caching=False``),
    driven synchronously by `run` (its background scheduler thread is stopped once started)."""
    require()
    esurge_cls = _internal("easydel.inference.esurge:eSurge")
    with _page_budget(page_budget_bytes):
        engine = esurge_cls(
            model=paged_model(model),
            tokenizer=tokenizer_path,
            dtype=model.dtype,
            max_model_len=max_model_len,
            page_size=page_size,
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=prefix_caching,
            async_scheduling=False,
            overlap_execution=False,
            destroy_pages_on_pause=False,
            reserve_tokens=0,
            silent_mode=True,
        )
    _stop_thread(engine)
    pin_page_hashes()
    try:
        _check_instance(engine)
        check_layout(engine, model)
    except ESurgeUnavailable:
        shutdown(engine)
        raise
    return engine


def _stop_thread(engine: Any) -> None:
    thread: threading.Thread | None = engine._scheduler_thread
    engine.terminate()
    if thread is not None:
        thread.join()


def shutdown(engine: Any) -> None:
    """Stops the scheduler and eSurge's tokenizer/detokenizer worker processes."""
    with contextlib.suppress(Exception):
        _stop_thread(engine)
    engine._worker_manager.shutdown()
    engine.runner.shutdown()


def worker_processes(engine: Any) -> list[Any]:
    """eSurge's tokenizer/detokenizer worker processes (``subprocess.Popen``) still alive."""
    manager = engine._worker_manager
    procs = [getattr(manager, name, None) for name in ("_tokenizer_process", "_detokenizer_process")]
    return [p for p in procs if p is not None and p.poll() is None]


def update_weights(engine: Any, model: Any) -> None:
    """Serves ``model``'s weights from now on (compiled programs kept; prefix cache cleared)."""
    engine.update_model_weights(paged_model(model), restart_scheduler=False)
    _stop_thread(engine)


def page_size(engine: Any) -> int:
    return int(engine.runner.metadata.page_size)


def _pool(engine: Any) -> Any:
    return engine.scheduler.kv_cache_manager.page_pool


def pages_in_use(engine: Any) -> int:
    """Pages held by running requests or by injected snapshots (not free, not the null page)."""
    pool = _pool(engine)
    return pool.num_pages - 1 - pool.get_num_free_pages()


def reset_prefix_cache(engine: Any) -> None:
    if not engine.scheduler.reset_prefix_cache():
        raise RuntimeError("eSurge's prefix cache could not be reset: pages are still held")


def reset_batch_state(engine: Any, key: jax.Array) -> None:
    """Starts a batch from a clean slate: the runner's row bookkeeping cleared (rows are then
    assigned in request order) and the sampling key set to ``key`` (eSurge folds it with the
    step's token count and each row's slot)."""
    engine.runner.reset_state()
    pin_page_hashes()
    manager = engine.runner.executor_manager
    manager.rng_key = jax.device_put(key, manager.rng_key.sharding)


def inject(engine: Any, token_ids: Sequence[int], keys: np.ndarray, values: np.ndarray) -> list[Any]:
    """Writes the KV of ``token_ids``' full pages into free pages and registers them as
    prefix-cache entries for those tokens; the pages stay held until `release`.

    Args:
      token_ids: the tokens the pages are keyed by (page i: tokens ``[i*P, (i+1)*P)``).
      keys, values: ``[layers, n * P, kv_heads, head_dim]``, post-RoPE, n = full pages to inject.

    Returns:
      the held pages.
    """
    size = page_size(engine)
    layers, positions, heads, head_dim = keys.shape
    if positions % size or positions > len(token_ids):
        raise ValueError(f"{positions} KV positions are not whole pages of {size} within {len(token_ids)} tokens")
    count = positions // size
    if count == 0:
        return []
    pool = _pool(engine)
    if pool.get_num_free_pages() < count:
        raise RuntimeError(
            f"eSurge's page pool has {pool.get_num_free_pages()} free pages, {count} needed: raise the page budget"
        )
    pages = pool.get_new_pages(count)
    ids = jnp.asarray([p.page_id for p in pages], jnp.int32)
    manager = engine.runner.executor_manager
    cache = manager.kv_pages
    if len(cache.views) != layers:
        raise ValueError(f"snapshot has {layers} layers, eSurge's cache {len(cache.views)}")
    views = [_write_pages(view, ids, keys[layer], values[layer]) for layer, view in enumerate(cache.views)]
    manager.kv_pages = cache.replace(views=views)
    utils = importlib.import_module("easydel.inference.esurge.core.utils")
    parent = None
    for i, page in enumerate(pages):
        page_tokens = [int(t) for t in token_ids[i * size : (i + 1) * size]]
        page_hash = utils.hash_page_tokens(page_content_hash, parent, page_tokens, None)
        keyed = utils.PageHashWithGroupId(page_hash, 0)
        page.page_hash = keyed
        pool.cached_page_hash_to_page[keyed][page.page_id] = page
        parent = page_hash.hash_value
    return pages


def _write_pages(view: Any, ids: jax.Array, keys: np.ndarray, values: np.ndarray) -> Any:
    """``view`` with pages ``ids`` holding ``keys``/``values`` ``[len(ids) * P, kv_heads, head_dim]``.

    Two layouts: ragged pages (``kv_pages`` ``[pages, P, groups, packing, storage_dim]``, which
    flattens to ``[pages, P, 2 * kv_heads, storage_dim]`` with K of head h at ``2h``, V at
    ``2h + 1``, head dim zero-padded) and unified attention (``key_cache`` / ``value_cache``
    ``[pages, P, kv_heads, head_dim]``). Anything else raises `ESurgeUnavailable`."""
    count = int(ids.shape[0])
    positions, heads, head_dim = keys.shape
    if hasattr(view, "kv_pages"):
        shape = view.kv_pages.shape
        if len(shape) != 5 or shape[2] * shape[3] != 2 * heads or shape[4] < head_dim:
            raise ESurgeUnavailable(f"eSurge's KV pages {shape} are not interleaved K/V of {heads} heads x {head_dim}")
        flat = np.zeros((positions, 2 * heads, shape[4]), np.dtype(view.kv_pages.dtype))
        flat[:, 0::2, :head_dim] = keys
        flat[:, 1::2, :head_dim] = values
        return view.replace(kv_pages=view.kv_pages.at[ids].set(jnp.asarray(flat.reshape(count, *shape[1:]))))
    if hasattr(view, "key_cache") and hasattr(view, "value_cache"):
        shape = view.key_cache.shape
        if len(shape) != 4 or shape[2] != heads or shape[3] != head_dim:
            raise ESurgeUnavailable(f"eSurge's key pages {shape} do not hold {heads} heads x {head_dim}")
        dtype = np.dtype(view.key_cache.dtype)
        k = jnp.asarray(keys.astype(dtype).reshape(count, *shape[1:]))
        v = jnp.asarray(values.astype(dtype).reshape(count, *shape[1:]))
        return view.replace(key_cache=view.key_cache.at[ids].set(k), value_cache=view.value_cache.at[ids].set(v))
    raise ESurgeUnavailable(f"vinekv cannot write KV into eSurge cache views of type {type(view).__name__}")


def _read_pages(view: Any, page_ids: np.ndarray, heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """K and V ``[len(page_ids) * P, kv_heads, head_dim]`` of pages ``page_ids`` (`_write_pages`'s
    inverse)."""
    if hasattr(view, "kv_pages"):
        pages = np.asarray(view.kv_pages[page_ids])
        flat = pages.reshape(-1, pages.shape[2] * pages.shape[3], pages.shape[4])
        return flat[:, 0 : 2 * heads : 2, :head_dim], flat[:, 1 : 2 * heads : 2, :head_dim]
    if hasattr(view, "key_cache") and hasattr(view, "value_cache"):
        k, v = np.asarray(view.key_cache[page_ids]), np.asarray(view.value_cache[page_ids])
        return k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
    raise ESurgeUnavailable(f"vinekv cannot read KV from eSurge cache views of type {type(view).__name__}")


def check_layout(engine: Any, model: Any, tolerance: float = 0.05) -> None:
    """Reads eSurge's own KV of a short prompt back through `capture_finished` and compares it
    with a dense forward of ``model``: raises `ESurgeUnavailable` when the page layout is not
    the one `_write_pages` / `_read_pages` assume (relative error above ``tolerance``)."""
    from easydel.inference.sampling_params import SamplingParams

    from vinekv.kvstore.capture import capture_state

    size = page_size(engine)
    tokens = (np.arange(size + 3) * 7 + 3) % int(model.config.get_text_config().vocab_size)
    try:
        with capture_finished(engine) as captured:
            run(engine, [request("vinekv-layout-check", tokens, SamplingParams(max_tokens=1, temperature=0.0))])
        _, keys, values = captured["vinekv-layout-check"]
    except (AttributeError, TypeError, ValueError, KeyError) as err:
        raise ESurgeUnavailable(f"vinekv cannot read eSurge's KV pages: {err!r}") from err
    dense = capture_state(model, tokens[None].astype(np.int32), len(tokens))
    for got, want in ((keys, dense.keys[:, 0]), (values, dense.values[:, 0])):
        got, want = got.astype(np.float32), want.astype(np.float32)
        if got.shape != want.shape or np.abs(got - want).max() > tolerance * np.abs(want).max() + 1e-3:
            raise ESurgeUnavailable(
                "eSurge's KV pages do not hold the model's KV where vinekv reads them (page layout of "
                f"easydel {easydel_version()} for this model differs from the one vinekv writes)"
            )
    reset_prefix_cache(engine)


def release(engine: Any, pages: list[Any]) -> None:
    """Drops the hold `inject` took (the pages stay cached until evicted or reset)."""
    _pool(engine).free_pages(list(reversed(pages)))


def request(request_id: str, token_ids: Sequence[int], params: Any) -> Any:
    engine_request = _internal("easydel.inference.esurge.request:EngineRequest")
    return engine_request(
        request_id=request_id, prompt_token_ids=[int(t) for t in token_ids], sampling_params=params, eos_token_id=None
    )


def run(engine: Any, requests: Sequence[Any], on_step: Any = None) -> dict[str, Finished]:
    """Schedules ``requests`` and steps the engine until all have finished.

    ``on_step()`` is called after every step (e.g. to sample page usage)."""
    scheduler, runner = engine.scheduler, engine.runner
    for item in requests:
        scheduler.add_request(item)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    cached: dict[str, int] = {}
    done: dict[str, Finished] = {}
    while scheduler.get_num_unfinished_requests():
        step = scheduler.schedule()
        outputs = scheduler.update_from_output(step, runner.execute_model(step))
        for batch in outputs.values():
            for out in batch.outputs:
                tokens[out.request_id].extend(int(t) for t in out.new_token_ids)
                cached.setdefault(out.request_id, int(out.num_cached_tokens or 0))
                if out.finish_reason is not None:
                    reason = str(getattr(out.finish_reason, "name", out.finish_reason)).lower()
                    done[out.request_id] = Finished(tokens[out.request_id], reason, cached[out.request_id])
        if on_step is not None:
            on_step()
    missing = set(tokens) - set(done)
    if missing:
        raise RuntimeError(f"eSurge stopped without finishing requests {sorted(missing)}")
    return done


def _install_capture(engine: Any, captured: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """Wraps ``engine.scheduler._free_pages`` (on the instance) so that every request it frees
    first leaves ``captured[request_id] = (token_ids, keys, values)``."""
    scheduler = engine.scheduler
    original = scheduler._free_pages
    layout = kv_layout(engine.runner.model)
    heads, head_dim = layout.num_kv_heads, layout.head_dim

    def read_then_free(req: Any) -> None:
        page_ids = np.asarray(scheduler.kv_cache_manager.get_page_ids(req.request_id)[0], np.int32)
        computed = int(req.num_computed_tokens)
        keys, values = [], []
        for view in engine.runner.executor_manager.kv_pages.views:
            k, v = _read_pages(view, page_ids, heads, head_dim)
            keys.append(k[:computed])
            values.append(v[:computed])
        tokens = np.asarray(req.all_token_ids[:computed], np.int32)
        captured[req.request_id] = (tokens, np.stack(keys), np.stack(values))
        original(req)

    scheduler._free_pages = read_then_free


def _remove_capture(scheduler: Any) -> None:
    vars(scheduler).pop("_free_pages", None)


@contextlib.contextmanager
def capture_finished(engine: Any) -> Iterator[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """While open, every request eSurge frees leaves ``{request_id: (token_ids, keys, values)}``
    in the yielded dict: the KV of its ``num_computed_tokens`` first tokens, read out of the page
    pool before the pages are freed, as ``[layers, t, kv_heads, head_dim]`` (head dim unpadded).
    The last sampled token of a request is never fed back, so its KV is not there."""
    captured: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    _install_capture(engine, captured)
    try:
        yield captured
    finally:
        _remove_capture(engine.scheduler)


@contextlib.contextmanager
def capture_generations(
    model_class: type, page_budget_bytes: int | None, engines: list[Any] | None = None
) -> Iterator[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """While open, `capture_finished` applies to every eSurge engine ``model_class.get_esurge``
    hands out (how EasyDeL's trainers reach their generation engine), and eSurge's page pool is
    sized with ``page_budget_bytes`` (None: eSurge's own sizing) whenever it is (re)built. Each
    engine handed out is appended to ``engines`` (once), for the caller to `shutdown`: EasyDeL
    keeps them cached on the model with their worker processes alive."""
    own = "get_esurge" in vars(model_class)
    original = model_class.get_esurge
    captured: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    hooked: list[Any] = []

    def get_esurge(self: Any, *args: Any, **kwargs: Any) -> Any:
        engine = original(self, *args, **kwargs)
        if engines is not None and all(e is not engine for e in engines):
            engines.append(engine)
        if "_free_pages" not in vars(engine.scheduler):
            _install_capture(engine, captured)
            hooked.append(engine.scheduler)
        return engine

    model_class.get_esurge = get_esurge
    try:
        with _page_budget(page_budget_bytes):
            yield captured
    finally:
        if own:
            model_class.get_esurge = original
        else:
            del model_class.get_esurge
        for scheduler in hooked:
            _remove_capture(scheduler)
