"""The eSurge branch engine: snapshots injected into eSurge's page pool, against the dense engine.

One eSurge engine (tiny float32 Llama, 16-token pages) serves the module; it is closed even when
a test fails.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import get_model, no_cache_logits
from easydel.inference.sampling_params import SamplingParams

from vinekv.kvstore import extract_state
from vinekv.models import build_tokenizer
from vinekv.replay import prefill
from vinekv.replay.engines import ESurgeEngine, ESurgeOptions, ESurgeUnavailable, VanillaEngine, open_engine
from vinekv.replay.engines import esurge_internals as internals
from vinekv.replay.engines.base import BranchSampling
from vinekv.replay.sampler import branch_keys, generate_branches

PAGE = 16


@pytest.fixture(scope="module")
def model():
    return get_model("llama", "float32")


@pytest.fixture(scope="module")
def engine(model):
    no_cache_logits(model, np.arange(4)[None])  # a model that has run holds its RoPE table as state
    options = ESurgeOptions(page_size=PAGE, max_model_len=128, max_num_seqs=64)
    with ESurgeEngine(model, build_tokenizer(), options=options) as opened:
        yield opened
    assert opened._engine is None


@pytest.fixture(scope="module")
def sequences():
    return np.random.default_rng(11).integers(0, 256, size=(4, 60)).astype(np.int32)


def states_at(model, ids, positions):
    """Single-row snapshots of ``ids[b, :t]`` from one dense prefill, for each ``(b, t)``."""
    cache, _ = prefill(model, ids, np.full(len(ids), ids.shape[1]), max_length=64)
    return [extract_state(model, cache, ids, t, rows=[b]) for b, t in positions]


def greedy(k: int) -> BranchSampling:
    return BranchSampling(k, 0.0, 0, 1.0, "esurge", eos_ids=frozenset(), stop_ids=frozenset())


def test_greedy_branches_equal_the_dense_engine_and_reuse_the_injected_pages(model, engine, sequences):
    """Greedy eSurge branches from injected snapshots equal the vanilla engine's; every prompt
    token below the snapshot's last full page came from the injected pages, not a prefill."""
    positions = [(0, 40), (1, 17), (2, 33), (3, 2), (0, 48)]
    states = states_at(model, sequences, positions)
    keys = branch_keys(0, [(b, t) for b, t in positions], 2)
    budgets = np.array([8, 12, 5, 6, 9])
    got = engine.expand(states, greedy(2), keys, budgets)
    want = VanillaEngine(model).expand(states, greedy(2), keys, budgets)
    for g, w in zip(got, want, strict=True):
        for x, y in zip(g.tokens, w.tokens, strict=True):
            np.testing.assert_array_equal(x, y)
        assert g.finish_reasons == w.finish_reasons == ["length"] * 2
    injected = sum((t - 1) // PAGE * PAGE for _, t in positions)
    assert engine.cached_tokens == 2 * injected
    assert engine.prefilled_tokens == 2 * (sum(t for _, t in positions) - injected)


def test_injected_kv_is_what_the_branches_continue(model, engine, sequences):
    """Y's KV injected under W's tokens (W, Y differ in the injected pages, agree after them):
    the continuation is Y's, not W's."""
    y = sequences[0, :40]
    w = np.concatenate([sequences[1, :32], y[32:]])
    state_y, state_w = states_at(model, np.stack([y, w]), [(0, 40), (1, 40)])
    forged = state_w.__class__(state_y.keys, state_y.values, state_w.token_ids, state_y.layout, state_y.fingerprint)
    keys = branch_keys(0, [(0, 0)], 1)
    budget = np.array([10])
    dense = VanillaEngine(model)
    follow_y = dense.expand([state_y], greedy(1), keys, budget)[0].tokens[0]
    follow_w = dense.expand([state_w], greedy(1), keys, budget)[0].tokens[0]
    assert not np.array_equal(follow_y, follow_w)
    got = engine.expand([forged], greedy(1), keys, budget)[0].tokens[0]
    np.testing.assert_array_equal(got, follow_y)
    assert engine.cached_tokens == 32


def test_k_branches_share_the_prefix_pages(model, engine, sequences):
    """K = 8 branches of one 49-token snapshot hold its 3 injected pages once, plus their own."""
    (state,) = states_at(model, sequences, [(0, 49)])
    engine.expand([state], greedy(8), branch_keys(0, [(0, 0)], 8), np.array([10]))
    own = -(-(49 + 10) // PAGE) - 3  # pages past the shared prefix each branch needs at most
    assert 3 + 8 * 1 <= engine.peak_pages <= 3 + 8 * own < 8 * (3 + own)


def test_captured_kv_equals_the_dense_cache(model, engine, sequences):
    """KV read out of eSurge's pages as a request is freed equals a dense prefill's."""
    params = SamplingParams(max_tokens=6, temperature=0.0)
    with internals.capture_finished(engine.esurge) as captured:
        internals.run(engine.esurge, [internals.request("cap", sequences[2, :37], params)])
    tokens, keys, values = captured["cap"]
    assert len(tokens) == 37 + 6 - 1  # the last sampled token is never fed back
    np.testing.assert_array_equal(tokens[:37], sequences[2, :37])
    (dense,) = states_at(model, tokens[None], [(0, len(tokens))])
    np.testing.assert_allclose(keys, dense.keys[:, 0], atol=2e-6)
    np.testing.assert_allclose(values, dense.values[:, 0], atol=2e-6)


def test_sampled_first_tokens_follow_the_softmax(model, engine, sequences):
    """512 first tokens at temperature 0.5 against the model's softmax: each of the likeliest
    tokens' frequency within 4.5 standard errors, and the same call gives the same branches."""
    (state,) = states_at(model, sequences, [(1, 30)])
    sampling = BranchSampling(64, 0.5, 0, 1.0, "esurge", eos_ids=frozenset(), stop_ids=frozenset())
    states = [state] * 8
    keys = branch_keys(3, [(0, i) for i in range(8)], 64)
    branches = engine.expand(states, sampling, keys, np.ones(8, int))
    first = np.array([b.tokens[k][0] for b in branches for k in range(64)])
    _, logits = prefill(model, sequences[1:2, :30], np.array([30]), max_length=64)
    probs = np.exp(np.asarray(logits, np.float64)[0] / 0.5)
    probs /= probs.sum()
    n = len(first)
    for token in np.argsort(probs)[::-1][:5]:
        se = np.sqrt(probs[token] * (1 - probs[token]) / n)
        assert abs(np.mean(first == token) - probs[token]) < 4.5 * se + 1e-9, (token, probs[token])
    again = engine.expand(states, sampling, keys, np.ones(8, int))
    assert [t.tolist() for b in again for t in b.tokens] == [t.tolist() for b in branches for t in b.tokens]


def test_generate_branches_runs_on_a_started_engine(model, engine, sequences, tokenizer_dir):
    """`generate_branches` with the engine object: EOS / stop ids / stop strings end branches as
    the dense engine's do (greedy)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    states = states_at(model, sequences, [(0, 40), (2, 20)])
    dense = generate_branches(model, states, SamplingParams(max_tokens=8, temperature=0.0), engine="vanilla")
    ends = [int(b.tokens[0][3]) for b in dense]  # each state's 4th greedy token becomes a stop id
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=ends[:1], stop=[chr(ends[1])])
    a = generate_branches(model, states, params, engine=engine, tokenizer=tok)
    b = generate_branches(model, states, params, engine="vanilla", tokenizer=tok)
    for x, y in zip(a, b, strict=True):
        assert x.finish_reasons == y.finish_reasons and x.lengths.tolist() == y.lengths.tolist()
        np.testing.assert_array_equal(x.tokens[0], y.tokens[0])
    assert a[0].finish_reasons == ["stop"] and a[0].lengths.tolist() == [4]


def test_auto_picks_esurge_when_it_can_and_logs_why_not(model, caplog):
    """``auto``: eSurge where it starts (and its workers end with it); the dense engine with the
    reason logged on a CPU by default, or for a model eSurge cannot serve from pages."""
    caplog.set_level(logging.INFO, logger="vinekv.replay.engines")
    assert isinstance(open_engine("auto", model), VanillaEngine) and "CPU backend" in caplog.text
    chosen = open_engine(
        "auto", model, tokenizer=build_tokenizer(), auto_on_cpu=True, esurge_options=ESurgeOptions(max_model_len=64)
    )
    try:
        assert isinstance(chosen, ESurgeEngine)
        workers = internals.worker_processes(chosen.esurge)
        assert workers
    finally:
        chosen.close()
    assert all(p.poll() is not None for p in workers)
    config = get_model("qwen2", "float32").config.get_text_config()
    before = config.sliding_window, config.use_sliding_window
    config.sliding_window, config.use_sliding_window = 8, True
    try:
        assert isinstance(open_engine("auto", get_model("qwen2", "float32"), auto_on_cpu=True), VanillaEngine)
    finally:
        config.sliding_window, config.use_sliding_window = before
    assert "sliding-window attention" in caplog.text


def test_missing_internal_names_the_easydel_version(monkeypatch):
    monkeypatch.setattr(internals, "_REQUIRED", (*internals._REQUIRED, "easydel.inference.esurge:eSurge.load_kv"))
    with pytest.raises(ESurgeUnavailable, match=r"eSurge\.load_kv, which easydel 0\.3\.0 does not have"):
        internals.require()


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="page_budget_mb must be > 0"):
        ESurgeOptions(page_budget_mb=0)
    with pytest.raises(ValueError, match="engine must be one of"):
        open_engine("paged", None)


def text_reward(prompts, completions, **_):
    """1 when the completion's byte sum is a multiple of 3: deterministic, about 1/3 of branches."""
    return [float(sum(c.encode()) % 3 == 0) for c in completions]


def test_value_estimation_on_esurge_agrees_with_vanilla(model, engine, sequences, tokenizer_dir):
    """`estimate_values` (the trainer's value estimation) on eSurge: greedy MC values identical
    to the dense engine's; sampled (K = 16) values statistically equal over all states."""
    from transformers import AutoTokenizer

    from vinekv.replay.branch_replay import ReplayConfig
    from vinekv.trainer.rollouts import Rollout
    from vinekv.trainer.value_estimation import estimate_values

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = np.random.default_rng(5)
    rollouts = []
    for row in range(3):
        response = rng.integers(32, 127, size=36).astype(np.int32)
        response[[7, 15, 24]] = 10  # "\n": four steps
        rollouts.append(Rollout(sequences[row, :20], response, group=row, row=row))
    dense = VanillaEngine(model)
    for k, temperature in ((1, 0.0), (16, 1.0)):
        config = ReplayConfig(mode="full", branches=k, max_tokens=12, temperature=temperature, sampler="esurge")
        got, _ = estimate_values("memory", model, tok, text_reward, rollouts, config, engine=engine)
        want, _ = estimate_values("memory", model, tok, text_reward, rollouts, config, engine=dense)
        a = np.concatenate([r.stats.mean for r in got])
        b = np.concatenate([r.stats.mean for r in want])
        assert a.size == b.size == 3 * 4
        if temperature == 0.0:
            np.testing.assert_array_equal(a, b)
        else:
            stderr = np.concatenate([r.stats.stderr for r in got + want])
            se = np.sqrt(np.sum(stderr**2)) / a.size
            assert abs(a.mean() - b.mean()) < 4 * se + 1e-9 and not np.array_equal(a, b)


def test_a_page_layout_other_than_assumed_is_refused(model, engine, monkeypatch):
    """The start-up check reads eSurge's own KV back and compares it with a dense forward: were
    K and V where vinekv does not expect them, the engine is refused (and `auto` falls back)."""
    internals.check_layout(engine.esurge, model)
    swapped = internals._read_pages
    monkeypatch.setattr(internals, "_read_pages", lambda *a: swapped(*a)[::-1])
    with pytest.raises(ESurgeUnavailable, match="page layout"):
        internals.check_layout(engine.esurge, model)


def test_trainer_reads_rollout_kv_out_of_esurge_instead_of_a_capture_forward(tmp_path, monkeypatch):
    """`use_esurge_generation=True`, `vineppo_engine="esurge"`: every rollout's KV comes out of
    the generation engine's pages (no capture forward), equals a dense forward's KV, and gives
    the MC values a capture forward gives; `close()` ends both engines' workers."""
    from trainer_kit import make_trainer, prompt_batch
    from transformers import AutoTokenizer

    import vinekv.trainer.value_estimation as estimation
    import vinekv.trainer.vineppo_trainer as vineppo_module
    from vinekv.kvstore.capture import capture_with_entropy
    from vinekv.models import build_tokenizer

    build_tokenizer(tmp_path / "tok")  # eSurge starts its tokenizer workers from a folder
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    tok.padding_side = "left"
    tr = make_trainer(tmp_path, tok, use_esurge_generation=True, vineppo_mode="full", vineppo_engine="esurge")
    forwards, seen = [], {}
    real_capture, real_estimate = estimation.capture_with_entropy, vineppo_module.estimate_values

    def estimate(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        seen["values"], seen["stats"] = real_estimate(*args, **kwargs)
        return seen["values"], seen["stats"]

    def counted_capture(model, sequences, *args, **kwargs):
        forwards.append(len(sequences))
        return real_capture(model, sequences, *args, **kwargs)

    monkeypatch.setattr(estimation, "capture_with_entropy", counted_capture)
    monkeypatch.setattr(vineppo_module, "estimate_values", estimate)
    try:
        _, metrics = tr._preprocess_batch_input(tr.model_state, prompt_batch(tok), is_train=True)
        rollouts, generated = seen["args"][4], seen["kwargs"]["generated_kv"]
        assert forwards == [] and metrics["vineppo/kv_from_generation"] == 1.0 and len(rollouts) == 8
        assert isinstance(seen["kwargs"]["engine"], ESurgeEngine)  # vineppo_engine="esurge" branches
        model = tr.model_state.model
        for rollout in rollouts:
            keys, values = generated[tuple(rollout.sequence[:-1].tolist())]
            ((dense, _),) = capture_with_entropy(model, [rollout.sequence[:-1]])
            np.testing.assert_allclose(keys, dense.keys[:, 0], atol=2e-6)
            np.testing.assert_allclose(values, dense.values[:, 0], atol=2e-6)
        kwargs = {**seen["kwargs"], "generated_kv": None}
        again, _ = real_estimate(*seen["args"], **kwargs)
        assert [r.returns for r in again] == [r.returns for r in seen["values"]]
        (generation,) = tr._generation_engines
        workers = internals.worker_processes(generation) + internals.worker_processes(tr._branch_engine.esurge)
        assert len(workers) == 4
    finally:
        tr.close()
    assert all(p.poll() is not None for p in workers)


def test_page_hashes_do_not_depend_on_the_process(engine):
    """eSurge keys pages by the builtin ``hash`` of ``(parent, tokens, None)`` from a seed drawn
    from os.urandom (and on Python < 3.12 ``hash(None)`` is an address). vinekv pins the seed and
    the hash: a page's key computed as eSurge computes it here equals the key another process
    (another PYTHONHASHSEED) computes."""
    import importlib
    import os
    import subprocess
    import sys

    from easydel.inference.esurge.core import utils

    manager = importlib.import_module("easydel.inference.esurge.core.manager")
    assert utils.none_hash == internals.PAGE_HASH_SEED and manager.hash is internals.page_content_hash
    tokens = tuple(range(100, 116))
    first = utils.hash_page_tokens(manager.hash, None, tokens, None).hash_value
    second = utils.hash_page_tokens(manager.hash, first, tokens, None).hash_value
    code = (
        "from vinekv.replay.engines.esurge_internals import PAGE_HASH_SEED, page_content_hash as h\n"
        f"a = h((PAGE_HASH_SEED, {tokens}, None)); print(a, h((a, {tokens}, None)))"
    )
    from pathlib import Path

    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert list(map(int, other.stdout.split())) == [first, second]
