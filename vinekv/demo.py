"""The end-to-end demo: sample responses, spill their KV to a snapshot store, resume and check.

Each sampled trajectory's KV is copied off the live batch cache (no second forward pass) and
spilled into a `SnapshotStore`. Snapshots at the prompt end and at a few positions inside the
response are then read back from the store, written into a fresh cache, the next token is fed
from there, and decoding continues with the row's own PRNG key. Agreement means the resumed
decode reproduces the uninterrupted one token for token (exact with the lossless codec), and
the resumed logits match a no-cache forward over the same prefix. Finally the stored run is
replayed offline (Lite-mode anchors, K branches each) into MC values of a toy reward, the
fraction of ASCII letters in the completion, written back into the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time

import jax.numpy as jnp
import numpy as np

from vinekv.configs import DemoConfig
from vinekv.kvstore import SnapshotStore, StoreSize, extract_state, policy_fingerprint, resume_from_state
from vinekv.kvstore.schema import MC_FIELD
from vinekv.models import build_model, build_tokenizer
from vinekv.replay import ReplayConfig, ReplayReport, decode, prefill, replay_run, row_keys_for

RUN = "demo"


@dataclasses.dataclass(frozen=True)
class SnapshotCheck:
    row: int
    position: int
    snapshot_bytes: int
    tokens_matched: int
    tokens_compared: int
    max_logit_diff: float


@dataclasses.dataclass(frozen=True)
class DemoReport:
    config: DemoConfig
    fingerprint: str
    prompt_lens: list[int]
    store: str
    store_size: StoreSize
    checks: list[SnapshotCheck]
    seconds: dict[str, float]
    replay: ReplayReport
    mc: dict[str, dict]

    @property
    def all_agree(self) -> bool:
        return all(c.tokens_matched == c.tokens_compared for c in self.checks)


def snapshot_positions(prompt_len: int, response_len: int, fractions: tuple[float, ...]) -> list[int]:
    """Prompt end plus ``prompt_len + round(f * response_len)`` for each fraction, deduplicated."""
    inside = [prompt_len + max(1, round(f * response_len)) for f in fractions]
    return sorted({prompt_len, *(p for p in inside if p < prompt_len + response_len - 1)})


def run_demo(config: DemoConfig) -> DemoReport:
    with contextlib.ExitStack() as stack:
        location = config.store or stack.enter_context(tempfile.TemporaryDirectory(prefix="vinekv-demo-"))
        with SnapshotStore.open(location, codec=config.codec) as store:
            return _run(config, store, location)


def _run(config: DemoConfig, store: SnapshotStore, location: str) -> DemoReport:
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    tokenizer = build_tokenizer()
    model = build_model(config.family, seed=config.seed, kv_dtype=getattr(jnp, config.kv_dtype))
    fingerprint = policy_fingerprint(model)
    seconds["build model"] = time.perf_counter() - clock

    clock = time.perf_counter()
    encoded = [tokenizer(p)["input_ids"] for p in config.prompts]
    prompt_lens = np.array([len(e) for e in encoded], dtype=np.int32)
    width = int(prompt_lens.max()) + config.response_tokens
    tokens = np.full((len(encoded), width), tokenizer.pad_token_id, dtype=np.int32)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)] = ids
    row_keys = row_keys_for(config.seed, len(encoded))
    cache, logits = prefill(model, tokens[:, : prompt_lens.max()], prompt_lens, max_length=width)
    sampled = decode(model, cache, logits, config.response_tokens, temperature=config.temperature, row_keys=row_keys)
    for row, plen in enumerate(prompt_lens):
        tokens[row, plen : plen + config.response_tokens] = sampled.tokens[row]
    seconds["sample"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if RUN in store.runs():
        store.delete_run(RUN)
    for row, (plen, prompt) in enumerate(zip(map(int, prompt_lens), config.prompts, strict=True)):
        end = plen + config.response_tokens
        state = extract_state(model, sampled.cache, tokens, end, rows=[row], fingerprint=fingerprint)
        store.spill(RUN, f"row{row}", state, plen, prompt=prompt)
    store.flush()
    seconds["spill"] = time.perf_counter() - clock

    clock = time.perf_counter()
    with model.mesh:  # one causal no-cache forward gives the reference logits at every position
        reference = np.asarray(model(input_ids=jnp.asarray(tokens)).logits)
    checks = []
    for row, plen in enumerate(map(int, prompt_lens)):
        end = plen + config.response_tokens
        for t in snapshot_positions(plen, config.response_tokens, config.snapshot_fractions):
            state = store.read_prefix(RUN, f"row{row}", t, model=model)
            resumed_logits, resumed = resume_from_state(
                model, state, tokens[row : row + 1, t : t + 1], max_length=width, check_policy=False
            )
            rest = decode(
                model,
                resumed,
                resumed_logits[:, -1],
                end - t - 1,
                temperature=config.temperature,
                row_keys=row_keys[row : row + 1],
            )
            checks.append(
                SnapshotCheck(
                    row=row,
                    position=t,
                    snapshot_bytes=state.nbytes,
                    tokens_matched=int((rest.tokens[0] == tokens[row, t + 1 : end]).sum()),
                    tokens_compared=end - t - 1,
                    max_logit_diff=float(np.abs(np.asarray(resumed_logits[0, -1]) - reference[row, t]).max()),
                )
            )
    seconds["read + resume + check"] = time.perf_counter() - clock

    clock = time.perf_counter()
    replay_config = ReplayConfig(
        mode="lite",
        branches=config.branches,
        max_tokens=config.branch_max_tokens,
        temperature=config.temperature,
        lite_anchor_stride=config.anchor_stride,
        unfinished_reward=None,  # a random model almost never emits EOS: score truncated branches too
        seed=config.seed,
    )
    replay = replay_run(store, RUN, model, tokenizer, letter_fraction, replay_config, progress=False)
    seconds["replay"] = time.perf_counter() - clock
    mc = {tid: store.trajectory(RUN, tid).fields[MC_FIELD] for tid in store.trajectories(RUN)}
    where = location if config.store else "a temporary folder"
    return DemoReport(config, fingerprint, prompt_lens.tolist(), where, store.size(RUN), checks, seconds, replay, mc)


def letter_fraction(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """Toy reward: the fraction of the completion's characters that are ASCII letters."""
    return [sum(ch.isascii() and ch.isalpha() for ch in c) / max(1, len(c)) for c in completions]


def format_report(report: DemoReport) -> str:
    cfg = report.config
    lines = [
        f"vinekv demo: {cfg.family} tiny random model, kv {cfg.kv_dtype}, policy {report.fingerprint[:12]}",
        f"{len(cfg.prompts)} prompts x {cfg.response_tokens} sampled tokens "
        f"(temperature {cfg.temperature}, seed {cfg.seed})",
        f"spilled to a {cfg.codec} snapshot store in {report.store}: {report.store_size.raw} raw KV bytes, "
        f"{report.store_size.stored} stored ({report.store_size.ratio:.2f}x smaller, metadata included)",
        "",
        f"{'row':>3} {'prompt':>6} {'snapshot t':>10} {'KV bytes':>9} {'tokens agreeing':>16} {'max |dlogit|':>13}",
    ]
    for c in report.checks:
        lines.append(
            f"{c.row:>3} {report.prompt_lens[c.row]:>6} {c.position:>10} {c.snapshot_bytes:>9} "
            f"{f'{c.tokens_matched}/{c.tokens_compared}':>16} {c.max_logit_diff:>13.2e}"
        )
    total = sum(c.tokens_compared for c in report.checks)
    matched = sum(c.tokens_matched for c in report.checks)
    lines += [
        "",
        f"agreement with uninterrupted decoding: {matched}/{total} tokens over {len(report.checks)} snapshots"
        + (" (exact)" if report.all_agree else " (MISMATCH)"),
        "",
        f"offline replay (Lite anchors every {cfg.anchor_stride} tokens, K={cfg.branches}, "
        f"{cfg.branch_max_tokens}-token branches, reward = ASCII letter fraction): {report.replay.states} states, "
        f"{report.replay.branches} branches, {report.replay.branch_tokens} branch tokens at "
        f"{report.replay.tokens_per_second:.0f} tokens/s",
    ]
    for tid, mc in report.mc.items():
        values = ", ".join(
            f"{p}:{m:.3f}±{se:.3f}" for p, m, se in zip(mc["positions"], mc["mean"], mc["stderr"], strict=True)
        )
        lines.append(f"  {tid} V(t) at t = {values}")
    lines += [
        "",
        "time: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in report.seconds.items()),
    ]
    return "\n".join(lines)
