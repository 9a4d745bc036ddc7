"""Branch sampling from stored snapshots, MC values against exact truths, offline replay."""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from easydel.inference.sampling_params import SamplingParams
from replay_kit import PROMPT, RESPONSES, answer_reward, copies, mc_records, spill_run

from vinekv.kvstore import (
    SnapshotStore,
    StalePolicyError,
    extract_state,
    forward_chunk,
    policy_fingerprint,
    resume_from_state,
)
from vinekv.kvstore.dense_cache import kv_bytes_per_token
from vinekv.models import build_model
from vinekv.replay import prefill, sample_tokens
from vinekv.replay.branch_replay import ReplayConfig, replay_run, select_states, state_key
from vinekv.replay.sampler import branch_keys, generate_branches
from vinekv.replay.values import MCRecord, mc_values


@pytest.fixture(scope="module")
def stored_run(tiny_model, tmp_path_factory):
    """Three trajectories with known step structure, spilled losslessly into a store."""
    path = tmp_path_factory.mktemp("replay") / "store"
    seqs, states = spill_run(tiny_model, path)
    return path, seqs, states


def test_branches_from_store_equal_live_and_uninterrupted(tiny_model, stored_run):
    path, seqs, _ = stored_run
    params = SamplingParams(n=4, max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True)
    t = len(PROMPT) + 4
    with SnapshotStore.open(path, mode="r") as store:
        from_store = store.read_prefix("r0", "t0", t, model=tiny_model)
    cache = tiny_model.init_cache(batch_size=1, max_length=seqs[0].shape[1])
    _, cache = forward_chunk(tiny_model, cache, seqs[0])
    live = extract_state(tiny_model, cache, seqs[0], t)
    keys = [("t0", 1)]
    a = generate_branches(tiny_model, [from_store], params, seed=7, state_keys=keys)[0]
    b = generate_branches(tiny_model, [live], params, seed=7, state_keys=keys)[0]
    for x, y in zip(a.tokens, b.tokens, strict=True):
        np.testing.assert_array_equal(x, y)
    # the same keys drawn by plain decoding after an uninterrupted prefill of the prefix
    cache, logits = prefill(tiny_model, np.repeat(seqs[0][:, :t], 4, 0), np.full(4, t), max_length=t + 10)
    rows = branch_keys(7, keys, 4)
    with tiny_model.mesh:
        toks = []
        for _ in range(10):
            tok, _ = jax.jit(sample_tokens, static_argnums=(3, 4, 5))(logits, rows, cache.views[0].indexs, 1.0, 50, 0.9)
            logits, cache = forward_chunk(tiny_model, cache, np.asarray(tok)[:, None])
            logits = logits[:, -1]
            toks.append(np.asarray(tok))
    np.testing.assert_array_equal(np.stack(toks, 1), np.stack(a.tokens))
    assert a.finish_reasons == ["length"] * 4 and list(a.lengths) == [10] * 4


def test_rerun_is_deterministic_across_batch_sizes(tiny_model, stored_run):
    _, _, states = stored_run
    params = SamplingParams(n=3, max_tokens=6, temperature=1.0)
    snaps = [s.prefix(t) for s in states for t in (9, 12)]
    keys = [(f"t{i}", j) for i in range(3) for j in range(2)]
    wide = generate_branches(tiny_model, snaps, params, seed=1, state_keys=keys, max_rows=64)
    narrow = generate_branches(tiny_model, snaps[::-1], params, seed=1, state_keys=keys[::-1], max_rows=3)[::-1]
    for x, y in zip(wide, narrow, strict=True):
        assert x.finish_reasons == y.finish_reasons
        for a, b in zip(x.tokens, y.tokens, strict=True):
            np.testing.assert_array_equal(a, b)
    other_seed = generate_branches(tiny_model, snaps[:1], params, seed=2, state_keys=keys[:1])[0]
    assert not all(np.array_equal(a, b) for a, b in zip(other_seed.tokens, wide[0].tokens, strict=True))


def test_branch_keys_are_the_fold_in_chain_whatever_the_count():
    """`branch_keys` pads its arrays to a size class (one compiled program for many counts): key
    i is still fold_in(fold_in(fold_in(PRNGKey(seed), state), position), branch)."""
    states = [(123456789, 3), ("t7", 0), (2**31 - 1, 17)]
    for k in (1, 5, 30):
        keys = branch_keys(11, states, k, first_branch=[0, 2, 9])
        assert keys.shape[0] == 3 * k
        for s, ((t, p), first) in enumerate(zip(states, (0, 2, 9), strict=True)):
            t = t if isinstance(t, int) else zlib.crc32(t.encode())
            for i in range(k):
                chain = jax.random.PRNGKey(11)
                for part in (t & 0x7FFFFFFF, p, first + i):
                    chain = jax.random.fold_in(chain, part)
                np.testing.assert_array_equal(keys[s * k + i], np.asarray(chain))


def test_a_states_branches_do_not_depend_on_the_batch(tiny_model, stored_run):
    """Batch invariance on the dense engine: the same state with the same keys gives the same
    branches decoded alone (4 rows) or with 15 other states in one 64-row batch, wherever it sits."""
    _, _, states = stored_run
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0)
    snaps = [s.prefix(t) for s in states for t in range(3, s.position + 1)][:16]
    keys = [(state_key(s.token_ids[0]), s.position) for s in snaps]
    alone = generate_branches(tiny_model, snaps[5:6], params, seed=4, state_keys=keys[5:6], max_rows=4)[0]
    for order in (slice(None), slice(None, None, -1)):
        batch = generate_branches(tiny_model, snaps[order], params, seed=4, state_keys=keys[order], max_rows=64)
        together = batch[order][5]
        assert together.finish_reasons == alone.finish_reasons
        for a, b in zip(together.tokens, alone.tokens, strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_dense_engines_cache_budget_splits_batches_not_branches(tiny_model, stored_run, monkeypatch):
    """`VanillaEngine(max_cache_mb=...)` decodes through fewer rows and holds fewer states at a
    time when their dense caches would exceed the budget; the branches are the ones one big
    batch gives (rows take the next branch as theirs end: 36 branches through 4 rows)."""
    from vinekv.replay.engines.vanilla import VanillaEngine

    _, _, states = stored_run
    snaps = [s.prefix(t) for s in states for t in (6, 9, 12)]
    keys = [(state_key(s.token_ids[0]), s.position) for s in snaps]
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0)
    calls = []
    run_pool = VanillaEngine._run_pool
    monkeypatch.setattr(
        VanillaEngine,
        "_run_pool",
        lambda self, group, keys, budgets, rows, pool_rows, *a: (
            calls.append((len(group), rows, pool_rows)) or run_pool(self, group, keys, budgets, rows, pool_rows, *a)
        ),
    )
    wide = generate_branches(tiny_model, snaps, params, seed=3, state_keys=keys, engine=VanillaEngine(tiny_model))
    assert calls == [(9, 64, 16)]
    # a row's cache: the longest position (12) + the 8-token budget, rounded up to 32 positions
    budget = 8 * 32 * kv_bytes_per_token(tiny_model) / 2**20  # 8 rows: 4 decode rows + a pool of 4 states
    narrow = generate_branches(
        tiny_model, snaps, params, seed=3, state_keys=keys, engine=VanillaEngine(tiny_model, max_cache_mb=budget)
    )
    assert calls[1:] == [(3, 4, 4)] * 3
    for x, y in zip(wide, narrow, strict=True):
        assert x.finish_reasons == y.finish_reasons
        for a, b in zip(x.tokens, y.tokens, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="max_cache_mb must be > 0"):
        VanillaEngine(tiny_model, max_cache_mb=0)


def test_stop_strings_eos_and_length(tiny_model, tokenizer_dir, stored_run):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    _, _, states = stored_run
    params = SamplingParams(n=64, max_tokens=40, temperature=1.0, stop=["a"], stop_token_ids=[98])  # 'a', 'b'
    branches = generate_branches(tiny_model, [states[0].prefix(10)], params, seed=0, tokenizer=tok)[0]
    for tokens, reason in zip(branches.tokens, branches.finish_reasons, strict=True):
        if reason == "stop":
            assert tokens[-1] in (97, 98) and not np.isin(tokens[:-1], [97, 98, 256]).any()
        elif reason == "eos":
            assert tokens[-1] == 256 and not np.isin(tokens[:-1], [97, 98]).any()
        else:
            assert reason == "length" and len(tokens) == 40 and not np.isin(tokens, [97, 98, 256]).any()
    assert {"stop", "length"} <= set(branches.finish_reasons)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate_branches(tiny_model, [states[0]], params)
    with pytest.raises(ValueError, match="repetition_penalty=1.2 is not supported"):
        generate_branches(tiny_model, [states[0]], SamplingParams(n=2, max_tokens=2, repetition_penalty=1.2))
    with pytest.raises(ValueError, match="engine must be one of"):
        generate_branches(tiny_model, [states[0]], SamplingParams(n=2, max_tokens=2), engine="paged")


def test_mc_estimates_match_exact_values(tiny_model, stored_run):
    """Rewards of the first one or two branch tokens have values computable from the model itself."""
    _, seqs, states = stored_run
    t = 12
    state = states[0].prefix(t)
    k = 1024
    branches = generate_branches(
        tiny_model, [state], SamplingParams(n=k, max_tokens=2, temperature=1.0, ignore_eos=True), seed=5, max_rows=512
    )[0]
    first = np.array([b[0] for b in branches.tokens])
    second = np.array([b[1] for b in branches.tokens])
    # exact next-token distribution at s, and the distribution after each possible first token
    logits, _ = resume_from_state(tiny_model, state.prefix(t - 1), seqs[0][:, t - 1 : t])
    p1 = np.asarray(jax.nn.softmax(logits[0, -1]))
    vocab = p1.shape[0]
    after, _ = resume_from_state(tiny_model, state, np.arange(vocab, dtype=np.int32)[:, None])
    p2 = np.asarray(jax.nn.softmax(after[:, -1], axis=-1))  # [first token, second token]
    even = np.arange(vocab) % 2 == 0
    truths = {
        "first token even": p1[even].sum(),
        "sum of two tokens even": (p1[even] * p2[even][:, even].sum(1)).sum()
        + (p1[~even] * p2[~even][:, ~even].sum(1)).sum(),
    }
    returns = np.stack([(first % 2 == 0), ((first + second) % 2 == 0)]).astype(float)
    stats = mc_values(returns)
    for (name, truth), mean, se in zip(truths.items(), stats.mean, stats.stderr, strict=True):
        assert abs(mean - truth) < 3 * se, f"{name}: MC {mean:.4f} vs exact {truth:.4f} (stderr {se:.4f})"


def test_select_states(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    response = list(RESPONSES[0])  # "2+3\n=5\nA: 5": steps start at 0, 4, 7
    np.testing.assert_array_equal(select_states(response, tok, ReplayConfig()), [0, 4, 7])
    np.testing.assert_array_equal(select_states(response, tok, ReplayConfig(max_states=2)), [0, 4])  # first
    spread = ReplayConfig(max_states=2, state_selection="spread")
    np.testing.assert_array_equal(select_states(response, tok, spread), [0, 7])
    np.testing.assert_array_equal(select_states(response, tok, ReplayConfig(mode="lite")), [10])
    np.testing.assert_array_equal(
        select_states(response, tok, ReplayConfig(mode="lite", lite_anchor_stride=4)), [0, 4, 8, 10]
    )


@pytest.mark.parametrize("mode", ["full", "lite"])
def test_no_state_at_or_after_trailing_special_tokens(tokenizer_dir, mode):
    """``"a=1\nb=2\n<eos>"``: EOS belongs to the last step ``"b=2\n<eos>"``; before the fix the
    split after the last newline survived and EOS got a state (and K branches) of its own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos, pad = tok.eos_token_id, tok.pad_token_id
    body = list(b"a=1\nb=2\n")
    config = ReplayConfig(mode=mode)
    for tail in ([eos], [eos, pad, pad], []):
        states = select_states(body + tail, tok, config)
        assert states.max() < len(body), (tail, states)
        if mode == "full":
            np.testing.assert_array_equal(states, [0, 4])
        else:
            np.testing.assert_array_equal(states, [len(body) - 1])
    # a special token inside the response is text like any other; only the trailing run is cut
    inner = list(b"a\n") + [eos] + list(b"b\n") + [eos]
    np.testing.assert_array_equal(select_states(inner, tok, ReplayConfig()), [0, 2])


def test_offline_replay_writes_values_and_resumes_after_a_crash(tiny_model, tokenizer_dir, stored_run, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = ReplayConfig(branches=4, max_tokens=6, seed=3, unfinished_reward=None)
    whole, broken, narrow = copies(stored_run[0], tmp_path, "whole", "broken", "narrow")

    with SnapshotStore.open(whole) as store:
        report = replay_run(
            store, "r0", tiny_model, tok, answer_reward, config, metrics_path=tmp_path / "m.jsonl", progress=False
        )
        assert (report.trajectories, report.skipped, report.states) == (3, 0, 3 + 2 + 1)
        # the three share the prompt state: 4 distinct states sampled, 6 valued
        assert (report.sampled_states, report.branches, report.separate_branches) == (4, 4 * 4, 4 * 6)
        assert report.branch_tokens <= 4 * 4 * 6
        expected = mc_records(store)
    assert expected["t0"]["positions"] == [8, 12, 15] and expected["t0"]["count"] == [4, 4, 4]
    means = [m for mc in expected.values() for m in mc["mean"]]
    assert all(0 < m < 1 for m in means) and len(set(means)) > 1, means
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [x["trajectory"] for x in lines] == ["t0", "t1", "t2"] and lines[0]["branches"] == 12

    calls = {"n": 0}

    def crashing(prompts, completions, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill during the second trajectory")
        return answer_reward(prompts, completions, **kwargs)

    with SnapshotStore.open(broken) as store:
        with pytest.raises(KeyboardInterrupt):  # one trajectory per call: t0 is committed before t1 is scored
            one_by_one = dataclasses.replace(config, trajectories_per_call=1)
            replay_run(store, "r0", tiny_model, tok, crashing, one_by_one, progress=False)
        assert "mc" in store.trajectory_info("r0", "t0")["fields"]
        assert "mc" not in store.trajectory_info("r0", "t1")["fields"]
        again = replay_run(store, "r0", tiny_model, tok, answer_reward, config, progress=False, trajectories=None)
        assert (again.trajectories, again.skipped) == (2, 1)
        resumed = mc_records(store)
        assert store.trajectory_info("r0", "t0")["fields"]["answer"] == "5"  # other fields kept
    assert resumed == expected
    # nothing is redone on a third run
    with SnapshotStore.open(whole) as store:
        third = replay_run(store, "r0", tiny_model, tok, answer_reward, config, progress=False)
        assert (third.trajectories, third.skipped) == (0, 3)
    # other batching, same values: 4 rows a decode call, and each trajectory valued on its own
    # (the prompt state sampled three times with the same keys instead of once)
    with SnapshotStore.open(narrow) as store:
        alone = dataclasses.replace(config, max_rows=4, trajectories_per_call=1)
        separate = replay_run(store, "r0", tiny_model, tok, answer_reward, alone, progress=False)
        assert (separate.sampled_states, separate.branches) == (6, 4 * 6)
        assert mc_records(store) == expected


def test_replay_values_again_what_another_policy_valued(tiny_model, tokenizer_dir, stored_run, tmp_path, caplog):
    """Values sampled by policy A are not values of policy B: replaying with B values them again
    from scratch (as a fresh replay with B would), unless ``keep_stale_values``; A replaying its
    own values skips them. A record without ``policy`` (older format) counts as the snapshot's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = ReplayConfig(branches=4, max_tokens=6, seed=3, unfinished_reward=None)
    other = build_model("llama", kv_dtype=jnp.float32, seed=1)
    mine, theirs = policy_fingerprint(tiny_model), policy_fingerprint(other)
    assert mine != theirs
    fresh_b, valued = copies(stored_run[0], tmp_path, "fresh_b", "valued")

    def run(store, model, **kwargs):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vinekv.replay.branch_replay"):
            report = replay_run(store, "r0", model, tok, answer_reward, config, progress=False, **kwargs)
        warnings = [r.getMessage() for r in caplog.records if "another policy" in r.getMessage()]
        return report, warnings

    with SnapshotStore.open(fresh_b) as store:
        run(store, other, allow_stale=True)
        expected_b = mc_records(store)
    assert {mc["policy"] for mc in expected_b.values()} == {theirs}
    with SnapshotStore.open(valued) as store:
        report, warnings = run(store, tiny_model)
        assert (report.trajectories, report.stale, warnings) == (3, 0, [])
        by_a = mc_records(store)
        assert {mc["policy"] for mc in by_a.values()} == {mine}
        legacy = {k: v for k, v in by_a["t1"].items() if k != "policy"}  # written before `policy` was stored
        store.annotate("r0", "t1", mc=legacy)
        assert MCRecord.from_fields(legacy).policy is None
        by_a["t1"] = legacy

        report, warnings = run(store, tiny_model)  # the same policy: nothing to do
        assert (report.trajectories, report.skipped, report.stale, warnings) == (0, 3, 0, [])
        assert mc_records(store) == by_a

        report, warnings = run(store, other, allow_stale=True, keep_stale_values=True)
        assert (report.trajectories, report.skipped, report.stale) == (0, 3, 0)
        assert len(warnings) == 1 and "3 of 3 trajectories of run 'r0'" in warnings[0] and "keeping" in warnings[0]
        assert mc_records(store) == by_a

        with pytest.raises(StalePolicyError, match="allow_stale"):  # B may not read A's snapshots unasked
            run(store, other)
        assert mc_records(store) == by_a

        report, warnings = run(store, other, allow_stale=True)
        assert (report.trajectories, report.skipped, report.stale) == (3, 0, 3)
        assert report.branches == 4 * 4  # from scratch (4 distinct states): A's returns are not extended
        assert len(warnings) == 1 and "3 of 3 trajectories of run 'r0'" in warnings[0] and "again" in warnings[0]
        by_b = mc_records(store)
    assert by_b == expected_b
    assert [mc["mean"] for mc in by_b.values()] != [mc["mean"] for mc in by_a.values()]


def test_replay_returns_the_records_it_writes(tiny_model, tokenizer_dir, stored_run, tmp_path):
    """``keep_records``: the report holds every record `replay_run` writes, equal to the stored one
    (a caller in the same process need not read them back), fresh or extended; reports merge them."""
    from transformers import AutoTokenizer

    from vinekv.replay.branch_replay import ReplayReport

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = ReplayConfig(branches=2, max_tokens=5, seed=5, unfinished_reward=None)
    (path,) = copies(stored_run[0], tmp_path, "kept")

    def replay(store, config, **kwargs):
        return replay_run(store, "r0", tiny_model, tok, answer_reward, config, progress=False, **kwargs)

    def as_stored(report):
        return {tid: record.to_fields() for tid, record in report.records.items()}

    with SnapshotStore.open(path) as store:
        first = replay(store, config, keep_records=True)
        assert as_stored(first) == mc_records(store) and len(first.records) == 3
        more = replay(store, dataclasses.replace(config, branches=3), keep_records=True, trajectories=["t0", "t2"])
        stored = mc_records(store)
        assert as_stored(more) == {tid: stored[tid] for tid in ("t0", "t2")}
        assert {c for mc in as_stored(more).values() for c in mc["count"]} == {3}  # extended, not redone
        assert replay(store, dataclasses.replace(config, branches=4)).records == {}  # kept only when asked
    merged = ReplayReport()
    for report in (first, more):
        merged.merge(report)
    assert as_stored(merged) == stored


def test_sampling_params_branch_count():
    config = ReplayConfig(branches=4)
    assert config.sampling_params().n == 4 and config.sampling_params(2).n == 2
    with pytest.raises(ValueError, match="n must be >= 1"):
        config.sampling_params(0)  # not silently the configured K


def test_shards_cover_the_run_exactly_once_with_a_single_process_values(
    tiny_model, tokenizer_dir, stored_run, tmp_path
):
    """`--shard i/N`: N independent replays, each of its shard, value every trajectory once, and
    the values are a single replay's (branch keys do not depend on the worker)."""
    from transformers import AutoTokenizer

    from vinekv.replay.branch_replay import parse_shard, shard_of

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = ReplayConfig(branches=3, max_tokens=5, seed=7, unfinished_reward=None)
    single, sharded = copies(stored_run[0], tmp_path, "single", "sharded")
    with SnapshotStore.open(single) as store:
        replay_run(store, "r0", tiny_model, tok, answer_reward, config, progress=False)
        expected = mc_records(store)
    ids = sorted(expected)
    for n in (2, 3):  # each trajectory in exactly one shard
        assert sorted(t for i in range(n) for t in ids if shard_of(t, n) == i) == ids
    valued = []
    with SnapshotStore.open(sharded) as store:
        for i in range(2):
            report = replay_run(store, "r0", tiny_model, tok, answer_reward, config, progress=False, shard=(i, 2))
            valued.append(report.trajectories)
        got = mc_records(store)
    assert sorted(valued) == [1, 2] and got == expected  # t2 in shard 0, t0 and t1 in shard 1
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
