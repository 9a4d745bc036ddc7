"""`vinekv inspect`: a snapshot store's runs, one run's trajectories, one trajectory's steps.

Three levels, each a table:

- ``inspect STORE``: per run, its trajectories, raw vs stored KV bytes and their ratio, codec,
  policy fingerprints, how many trajectories carry MC values and their mean value and K.
- ``inspect STORE --run R``: per trajectory, prompt/response tokens, reward, valued states and
  their MC statistics, other task fields.
- ``inspect STORE --run R --trajectory T [--plot FILE.png]``: per state, its response position,
  the text of its step, MC value, standard error, K and the step's advantage
  (`trainer.advantages.trajectory_advantages`, gamma 1); the plot draws the values and the
  per-token advantages along the response.

``load_*`` read the store into plain records, ``format_*`` turn records into text, `plot_steps`
draws; `inspect_store` ties them together (I/O at the edges).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vinekv.kvstore.schema import ENTROPY_FIELD, MC_FIELD, REWARD_FIELD, TrajectoryNode
from vinekv.replay.values import MCRecord

LAMBDA = 0.95  # mc_gae's lambda for Lite advantages (trajectory_advantages' default)
HIDDEN_FIELDS = (MC_FIELD, REWARD_FIELD, ENTROPY_FIELD)  # shown as columns, or too long to show
STEP_TEXT_WIDTH = 40
FIELDS_WIDTH = 60
MISSING = "-"


# -- records -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One run of a store.

    Attributes:
      name: the run.
      trajectories: committed trajectories.
      raw_bytes, stored_bytes: KV bytes uncompressed (cache dtype) and on disk.
      codecs: distinct codecs of its trajectories (``int8+zstd3``).
      fingerprints: distinct policy fingerprints, in order of first appearance.
      valued: trajectories carrying MC values (``fields["mc"]``).
      modes: distinct replay modes of those values.
      states: valued states (K >= 1) over the run.
      mean_value: mean MC value over those states (NaN: none).
      mean_k: mean branches per valued state (NaN: none).
    """

    name: str
    trajectories: int
    raw_bytes: int
    stored_bytes: int
    codecs: tuple[str, ...]
    fingerprints: tuple[str, ...]
    valued: int
    modes: tuple[str, ...]
    states: int
    mean_value: float
    mean_k: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else math.nan


@dataclasses.dataclass(frozen=True)
class TrajectoryRow:
    """One trajectory of a run: ``record`` is None without MC values (``problem`` says why when
    the stored values could not be read)."""

    tid: str
    prompt_tokens: int
    response_tokens: int
    reward: float | None
    record: MCRecord | None
    fields: Mapping[str, Any]
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class Step:
    """Response tokens ``[start, end)``: from one state to the next (``state`` False for the
    text before the first state, which Lite anchors may leave)."""

    start: int
    end: int
    text: str
    state: bool
    count: int = 0
    mean: float = math.nan
    stderr: float = math.nan
    advantage: float = math.nan


@dataclasses.dataclass(frozen=True)
class TrajectorySteps:
    """One trajectory cut into its steps; ``token_advantages`` ``[T]`` is None when the reward is
    unknown or the trajectory has no MC values."""

    run: str
    tid: str
    prompt_text: str
    prompt_tokens: int
    response_tokens: int
    reward: float | None
    mode: str | None
    steps: tuple[Step, ...]
    token_advantages: np.ndarray | None
    fields: Mapping[str, Any]
    tokenizer: str
    notes: tuple[str, ...] = ()


# -- small formatting helpers ------------------------------------------------------------------
def fmt_num(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, `MISSING` for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.{digits}f}"


def fmt_signed(value: float | None, digits: int = 3) -> str:
    if value is None or math.isnan(value):
        return MISSING
    return f"{value:+.{digits}f}"


def fmt_bytes(n: int) -> str:
    """``1536`` -> ``1.5 KiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def escape(text: str) -> list[str]:
    """``text`` as printable pieces: newline -> ``\\n``, tab -> ``\\t``, other control
    characters as Python escapes (one piece per character, so truncation never cuts one)."""
    special = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
    return [special.get(ch) or (ch if ch.isprintable() else repr(ch)[1:-1]) for ch in text]


def shorten(text: str, width: int) -> str:
    """``text`` escaped (`escape`) and cut to at most ``width`` characters, keeping its head and
    its tail (where a step's result usually is) around ``…``."""
    pieces = escape(text)
    if sum(map(len, pieces)) <= width:
        return "".join(pieces)
    budget = max(1, width - 1)
    head_budget = budget - budget // 3
    head, used = [], 0
    for piece in pieces:
        if used + len(piece) > head_budget:
            break
        head.append(piece)
        used += len(piece)
    tail, used_tail = [], 0
    for piece in reversed(pieces[len(head) :]):
        if used + used_tail + len(piece) > budget:
            break
        tail.append(piece)
        used_tail += len(piece)
    return "".join(head) + "…" + "".join(reversed(tail))


def compact_value(value: Any, width: int = 24) -> str:
    """A field value in a few characters: strings escaped and cut, floats 4 significant
    digits, long lists and dicts by their size."""
    if isinstance(value, str):
        return f"'{shorten(value, width)}'"
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        if len(value) <= 4 and all(isinstance(v, int | float | bool) or v is None for v in value):
            return "[" + ", ".join(compact_value(v) for v in value) + "]"
        return f"[{len(value)} items]"
    if isinstance(value, Mapping):
        return f"{{{len(value)} keys}}"
    return shorten(str(value), width)


def compact_fields(fields: Mapping[str, Any], width: int = FIELDS_WIDTH) -> str:
    """``key=value`` of the fields not shown elsewhere (`HIDDEN_FIELDS`), cut to ``width``."""
    text = ", ".join(f"{k}={compact_value(v)}" for k, v in fields.items() if k not in HIDDEN_FIELDS)
    return text if len(text) <= width else text[: width - 1] + "…"


def table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> str:
    """A plain-text table: ``align`` has one ``l``/``r`` per column."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align, strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def codec_name(spec: Mapping[str, Any]) -> str:
    """``{"name": "int8", "zstd_level": 3, ...}`` -> ``int8+zstd3``."""
    level = spec.get("zstd_level")
    return f"{spec.get('name', '?')}" + (f"+zstd{level}" if level else "")


def fingerprint_cell(fingerprints: Sequence[str]) -> str:
    """One short fingerprint, or how many distinct ones (a run sampled by several policies)."""
    short = [f[:8] for f in fingerprints]
    if len(short) <= 1:
        return short[0] if short else MISSING
    return f"{len(short)} distinct: " + ", ".join(short[:2]) + (", …" if len(short) > 2 else "")


def k_cell(counts: np.ndarray) -> str:
    """Branches per valued state: ``4``, or ``2-8`` where they differ."""
    counts = np.asarray(counts)[np.asarray(counts) > 0]
    if counts.size == 0:
        return MISSING
    lo, hi = int(counts.min()), int(counts.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


def record_of(node: TrajectoryNode) -> tuple[MCRecord | None, str | None]:
    """The trajectory's MC record, or None and why not (no values / unreadable ones)."""
    try:
        return MCRecord.of(node), None
    except (ValueError, TypeError, KeyError) as err:
        return None, str(err)


# -- level 1: runs -------------------------------------------------------------------------------
def summarize_run(name: str, raw: int, stored: int, nodes: Sequence[TrajectoryNode]) -> RunSummary:
    """`RunSummary` from a run's sizes and its trajectories."""
    fingerprints = list(dict.fromkeys(n.fingerprint for n in nodes))
    codecs = tuple(dict.fromkeys(codec_name(n.codec) for n in nodes))
    records = [r for r in (record_of(n)[0] for n in nodes) if r is not None]
    means, counts = [], []
    for record in records:
        stats = record.stats
        valued = stats.count > 0
        means.extend(stats.mean[valued].tolist())
        counts.extend(stats.count[valued].tolist())
    return RunSummary(
        name=name,
        trajectories=len(nodes),
        raw_bytes=raw,
        stored_bytes=stored,
        codecs=codecs,
        fingerprints=tuple(fingerprints),
        valued=len(records),
        modes=tuple(dict.fromkeys(r.mode for r in records)),
        states=len(means),
        mean_value=float(np.mean(means)) if means else math.nan,
        mean_k=float(np.mean(counts)) if counts else math.nan,
    )


def load_runs(store: Any) -> list[RunSummary]:
    out = []
    for run in store.runs():
        size = store.size(run)
        nodes = [store.trajectory(run, tid) for tid in store.trajectories(run)]
        out.append(summarize_run(run, size.raw, size.stored, nodes))
    return out


def format_layout(layout: Any) -> str:
    if layout is None:
        return "layout: none yet (empty store)"
    return (
        f"layout: {layout.model_type}, {layout.num_layers} layers x {layout.num_kv_heads} KV heads x "
        f"{layout.head_dim}, {layout.dtype}, vocabulary {layout.vocab_size}"
    )


def format_runs(location: str, codec: str, layout: Any, runs: Sequence[RunSummary]) -> str:
    head = f"store {location} (codec of new runs {codec})\n{format_layout(layout)}"
    if not runs:
        return head + "\nno runs"
    rows = [
        [
            r.name,
            r.trajectories,
            fmt_bytes(r.raw_bytes),
            fmt_bytes(r.stored_bytes),
            f"{r.ratio:.2f}x",
            ", ".join(r.codecs) or MISSING,
            fingerprint_cell(r.fingerprints),
            f"{r.valued}/{r.trajectories}",
            ", ".join(r.modes) or MISSING,
            r.states,
            fmt_num(r.mean_value),
            fmt_num(r.mean_k, 1),
        ]
        for r in runs
    ]
    header = ["run", "traj", "raw", "stored", "ratio", "codec", "fingerprint", "MC", "mode", "states", "mean V", "K"]
    body = table(header, rows, "lrrrrllrlrrr")
    legend = (
        "MC: trajectories with MC values; states: valued states; mean V: their mean MC value; "
        "K: mean branches per valued state.\n"
        "`vinekv inspect STORE --run RUN` lists a run's trajectories."
    )
    return f"{head}\n{len(runs)} run{'s' if len(runs) > 1 else ''}\n\n{body}\n\n{legend}"


# -- level 2: one run's trajectories ---------------------------------------------------------------
def trajectory_row(tid: str, node: TrajectoryNode) -> TrajectoryRow:
    record, problem = record_of(node)
    return TrajectoryRow(
        tid=tid,
        prompt_tokens=node.prompt_len,
        response_tokens=node.stored_tokens,
        reward=None if node.reward is None else float(node.reward),
        record=record,
        fields=node.fields,
        problem=problem,
    )


def load_trajectories(store: Any, run: str) -> list[TrajectoryRow]:
    return [trajectory_row(tid, store.trajectory(run, tid)) for tid in store.trajectories(run)]


def format_trajectories(run: str, size: Any, rows: Sequence[TrajectoryRow]) -> str:
    cells = []
    for r in rows:
        stats = r.record.stats if r.record is not None else None
        valued = stats.mean[stats.count > 0] if stats is not None else np.array([])
        states = f"{valued.size}/{len(stats.count)}" if stats is not None else ("unreadable" if r.problem else MISSING)
        cells.append(
            [
                r.tid,
                r.prompt_tokens,
                r.response_tokens,
                fmt_num(r.reward),
                states,
                fmt_num(float(valued.mean())) if valued.size else MISSING,
                fmt_num(float(valued.min())) if valued.size else MISSING,
                fmt_num(float(valued.max())) if valued.size else MISSING,
                k_cell(stats.count) if stats is not None else MISSING,
                compact_fields(r.fields) or MISSING,
            ]
        )
    header = ["trajectory", "prompt", "response", "reward", "states", "mean V", "min V", "max V", "K", "fields"]
    valued = sum(r.record is not None for r in rows)
    head = (
        f"run {run}: {len(rows)} trajectories ({valued} with MC values), KV {fmt_bytes(size.raw)} raw, "
        f"{fmt_bytes(size.stored)} stored ({size.ratio:.2f}x)"
    )
    legend = [
        "prompt/response: tokens; reward: field vinekv_reward; states: valued/all states; "
        "V: MC values of the valued states; K: branches per state."
    ]
    legend += [f"{r.tid}: MC values unreadable: {r.problem}" for r in rows if r.problem]
    legend.append(f"`vinekv inspect STORE --run {run} --trajectory ID` shows one trajectory's steps.")
    return f"{head}\n\n{table(header, cells, 'lrrrrrrrll')}\n\n" + "\n".join(legend)


# -- level 3: one trajectory's steps ---------------------------------------------------------------
def choose_tokenizer(path: str | None, vocab_size: int | None) -> tuple[Any, str]:
    """``(tokenizer, description)``: ``path``'s (``AutoTokenizer``), else the arithmetic task's
    when the store's vocabulary is the task's, else the byte tokenizer."""
    if path:
        from transformers import AutoTokenizer

        if not Path(path).expanduser().is_dir():
            raise FileNotFoundError(f"--tokenizer {path}: no such folder (a Hugging Face tokenizer folder)")
        return AutoTokenizer.from_pretrained(str(Path(path).expanduser())), f"tokenizer {path}"
    from vinekv.tasks import arithmetic

    if vocab_size == arithmetic.vocab_size():
        return arithmetic.build_task_tokenizer(), "arithmetic task tokenizer"
    from vinekv.models import build_tokenizer

    return build_tokenizer(), "byte tokenizer"


def step_spans(response_positions: Sequence[int], response_len: int) -> list[tuple[int, int, bool]]:
    """``(start, end, is_state)`` covering ``[0, response_len)``: one span per state up to the
    next, and a leading stateless span when the first state is after 0."""
    starts = [int(p) for p in response_positions]
    spans = [(0, starts[0], False)] if starts and starts[0] > 0 else []
    ends = starts[1:] + [response_len]
    return spans + [(s, e, True) for s, e in zip(starts, ends, strict=True)]


def build_steps(
    response_ids: Sequence[int],
    record: MCRecord | None,
    reward: float | None,
    decode: Any,
) -> tuple[list[Step], np.ndarray | None]:
    """The steps of a response (its text decoded by ``decode(ids) -> str``) with their MC
    statistics and advantages; the token advantages ``[T]`` (None without reward or values)."""
    from vinekv.trainer.advantages import trajectory_advantages

    n = len(response_ids)
    if record is None:
        return [Step(0, n, decode(list(response_ids)), False)], None
    stats = record.stats
    token_adv = None
    if reward is not None and n:
        token_adv = trajectory_advantages(
            record.mode, n, record.response_positions, stats.mean, float(reward), gamma=1.0, lam=LAMBDA
        )
    steps, index = [], 0
    for start, end, is_state in step_spans(record.response_positions.tolist(), n):
        text = decode(list(response_ids[start:end]))
        if not is_state:
            steps.append(Step(start, end, text, False))
            continue
        adv = float(np.mean(token_adv[start:end])) if token_adv is not None and end > start else math.nan
        steps.append(
            Step(
                start,
                end,
                text,
                True,
                count=int(stats.count[index]),
                mean=float(stats.mean[index]),
                stderr=float(stats.stderr[index]),
                advantage=adv,
            )
        )
        index += 1
    return steps, token_adv


def load_steps(store: Any, run: str, tid: str, tokenizer_path: str | None = None) -> TrajectorySteps:
    node = store.trajectory(run, tid)
    tokenizer, described = choose_tokenizer(tokenizer_path, node.layout.vocab_size)
    ids = store.token_ids(run, tid)
    plen = node.prompt_len
    record, problem = record_of(node)
    reward = None if node.reward is None else float(node.reward)

    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=False) if part else ""

    steps, token_adv = build_steps(ids[plen:], record, reward, decode)
    notes = []
    if ids and max(ids) >= len(tokenizer):
        notes.append(
            f"token ids up to {max(ids)} but the {described} has {len(tokenizer)}: the text is wrong, "
            "pass --tokenizer FOLDER"
        )
    if problem:
        notes.append(f"MC values unreadable: {problem}")
    elif record is None:
        notes.append("no MC values: value the run with `vinekv replay`")
    if record is not None and reward is None:
        notes.append(f"reward unknown (no field {REWARD_FIELD}): advantages skipped")
    return TrajectorySteps(
        run=run,
        tid=tid,
        prompt_text=decode(ids[:plen]),
        prompt_tokens=plen,
        response_tokens=len(ids) - plen,
        reward=reward,
        mode=record.mode if record is not None else None,
        steps=tuple(steps),
        token_advantages=token_adv,
        fields=node.fields,
        tokenizer=described,
        notes=tuple(notes),
    )


def format_steps(t: TrajectorySteps, width: int = STEP_TEXT_WIDTH) -> str:
    head = [
        f"run {t.run}, trajectory {t.tid}: {t.prompt_tokens} prompt + {t.response_tokens} response tokens, "
        f"reward {fmt_num(t.reward) if t.reward is not None else 'unknown'}, MC mode {t.mode or MISSING}",
        f"prompt: {shorten(t.prompt_text, 2 * FIELDS_WIDTH)}",
    ]
    other = compact_fields(t.fields, 2 * FIELDS_WIDTH)
    if other:
        head.append(f"fields: {other}")
    rows = [
        [
            s.start if s.state else f"({s.start})",
            shorten(s.text, width),
            fmt_num(s.mean) if s.state else MISSING,
            fmt_num(s.stderr) if s.state else MISSING,
            s.count if s.state else MISSING,
            fmt_signed(s.advantage) if s.state else MISSING,
        ]
        for s in t.steps
    ]
    body = table(["pos", "text", "V", "stderr", "K", "adv"], rows, "rlrrrr")
    adv_rule = (
        "the step's A_j = r_j + V(s_j+1) - V(s_j) (gamma 1)"
        if t.mode == "full"
        else f"mean token advantage of the span (mc_gae, gamma 1, lambda {LAMBDA})"
    )
    legend = [
        "pos: the state's response position (in parentheses: text before the first state); "
        f"text: decoded with the {t.tokenizer}, newlines as \\n",
        f"V: MC value, stderr: its standard error, K: branches; adv: {adv_rule}",
    ]
    return "\n".join(head) + f"\n\n{body}\n\n" + "\n".join(legend + list(t.notes))


def plot_steps(t: TrajectorySteps, path: str | Path) -> Path:
    """Writes a PNG: MC values with ±stderr error bars at their states, and the per-token
    advantages, along the response."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = [s for s in t.steps if s.state]
    if not states:
        raise ValueError(f"trajectory {t.tid!r} of run {t.run!r} has no MC values to plot (run `vinekv replay`)")
    path = Path(path).expanduser()
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    try:
        x = [s.start for s in states]
        top.errorbar(x, [s.mean for s in states], yerr=[s.stderr for s in states], fmt="o-", capsize=3)
        top.set_ylabel("MC value V(s)")
        top.grid(alpha=0.3)
        if t.token_advantages is not None:
            adv = t.token_advantages
            bottom.stairs(adv, np.arange(adv.size + 1), color="tab:orange")
            bottom.axhline(0.0, color="grey", lw=0.8)
        else:
            bottom.text(0.5, 0.5, "reward unknown: no advantages", ha="center", va="center", transform=bottom.transAxes)
        bottom.set_ylabel("advantage per token")
        for axis in (top, bottom):
            for start in x:
                axis.axvline(start, color="grey", lw=0.6, ls=":")
        bottom.set_xlim(0, max(t.response_tokens, 1))
        bottom.set_xlabel("response position (tokens); dotted: states")
        bottom.grid(alpha=0.3)
        reward = fmt_num(t.reward) if t.reward is not None else "unknown"
        fig.suptitle(f"run {t.run}, trajectory {t.tid} ({t.mode}, reward {reward})")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


# -- entry point -----------------------------------------------------------------------------------
def inspect_store(
    location: str,
    run: str | None = None,
    trajectory: str | None = None,
    plot: str | None = None,
    tokenizer: str | None = None,
) -> str:
    """The text `vinekv inspect` prints (and the plot written, with ``plot``).

    Raises:
      ValueError: ``trajectory`` without ``run``, ``plot`` without ``trajectory``.
      FileNotFoundError: no such local store folder.
      vinekv.kvstore.store.StoreError: not a store, unknown run or trajectory.
    """
    from vinekv.kvstore import SnapshotStore
    from vinekv.kvstore.store import MissingEntryError

    if trajectory is not None and run is None:
        raise ValueError("--trajectory needs --run (trajectory ids are unique within a run)")
    if plot is not None and trajectory is None:
        raise ValueError("--plot needs --trajectory (it draws one trajectory's values and advantages)")
    if "://" not in location and not Path(location).expanduser().exists():
        raise FileNotFoundError(f"no store at {location}: no such folder")
    with SnapshotStore.open(location, mode="r") as store:
        if run is None:
            return format_runs(location, repr(store.codec), store.layout, load_runs(store))
        ids = store.trajectories(run)  # MissingEntryError naming the runs
        if trajectory is None:
            return format_trajectories(run, store.size(run), load_trajectories(store, run))
        if trajectory not in ids:
            listed = ", ".join(ids[:10]) + (", …" if len(ids) > 10 else "")
            raise MissingEntryError(f"no trajectory {trajectory!r} in run {run!r} (trajectories: {listed})")
        steps = load_steps(store, run, trajectory, tokenizer)
    text = format_steps(steps)
    if plot is not None:
        text += f"\nplot written to {plot_steps(steps, plot)}"
    return text
