"""The eSurge engine: snapshots injected into EasyDeL's paged engine as prefix-cache hits.

For a snapshot at ``t`` (KV of ``[0, t)``), the KV of its full pages below ``t - 1`` is written
into free pages of eSurge's page pool and registered under the page hashes of its tokens; K
requests with the snapshot's tokens as prompt then find those pages in the prefix cache and
share them (each holds a reference; nothing is copied K times). eSurge prefills only the rest:
the partial last page and the last token (at most ``page_size`` tokens; it always recomputes the
last prompt token to get the next-token logits). Pages are released after the batch.

Sampling follows eSurge's sampler (top-k, then top-p, then temperature, `vinekv.replay.truncated_logits`
``sampler="esurge"``). eSurge has no per-request keys: it draws every row from one engine key
folded with the row's batch slot. The engine key is reset from the batch's first branch key
before each batch and batches are scheduled synchronously, so the same call (same states, K,
seed, options) gives the same branches on any engine instance; branch i of a state is *not*
keyed by i alone as in the vanilla engine (it depends on the batch it runs in), and eSurge
branches do not equal vanilla branches except when greedy.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from vinekv.kvstore.dense_cache import kv_layout
from vinekv.kvstore.state import CachedState
from vinekv.replay.engines import esurge_internals as internals
from vinekv.replay.engines.base import BranchEngine, Branches, BranchSampling, cut_at_stop_strings

logger = logging.getLogger(__name__)

CPU_PAGE_BUDGET_MB = 16.0  # a CPU reports no device memory; eSurge would take 4 GiB


@dataclasses.dataclass(frozen=True)
class ESurgeOptions:
    """How the eSurge engine is sized.

    Attributes:
      page_size: tokens per KV page.
      page_budget_mb: MiB of KV pages per device; None: 16 MiB on CPU, eSurge's own sizing
        (``hbm_utilization`` of free device memory) on accelerators.
      max_model_len: longest prompt + branch in tokens; None: the model's
        ``max_position_embeddings``, at most 2048.
      max_num_seqs: branches decoded together.
    """

    page_size: int = 16
    page_budget_mb: float | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 64

    def __post_init__(self) -> None:
        budget, length = self.page_budget_mb, self.max_model_len
        checks = [
            (self.page_size >= 1, f"page_size must be >= 1, got {self.page_size}"),
            (budget is None or budget > 0, f"page_budget_mb must be > 0, got {budget}"),
            (length is None or length >= 2, f"max_model_len must be >= 2, got {length}"),
            (self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def budget_bytes(self) -> int | None:
        """The page budget eSurge is given (None: its own sizing)."""
        if self.page_budget_mb is None and jax.default_backend() != "cpu":
            return None
        return int((self.page_budget_mb or CPU_PAGE_BUDGET_MB) * 2**20)


def unsupported_reason(model: Any) -> str | None:
    """Why injected snapshots cannot be served by eSurge for ``model``, or None."""
    config = model.config.get_text_config()
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"{config.model_type} uses sliding-window attention (pages outside the window are dropped)"
    if getattr(config, "kv_lora_rank", None):
        return f"{config.model_type} uses MLA attention (a latent KV, not per-head K/V pages)"
    if getattr(config, "layer_types", None) and any(t != "full_attention" for t in config.layer_types):
        return f"{config.model_type} mixes attention types {sorted(set(config.layer_types))}"
    return None


class ESurgeEngine(BranchEngine):
    """Branches on EasyDeL's eSurge from injected snapshots (see the module docstring).

    Args:
      model: the policy (an EasyDeL causal LM with full attention in every layer).
      tokenizer: a tokenizer or a folder holding one; eSurge starts tokenizer workers from a
        folder (vinekv passes token ids, so only the tokens' vocabulary matters); required
        when the engine starts.
      options: page size, page budget, lengths.
    """

    name = "esurge"

    def __init__(self, model: Any, tokenizer: Any = None, options: ESurgeOptions = ESurgeOptions()):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self._engine: Any = None
        self._folder: tempfile.TemporaryDirectory | None = None
        self._finalizer: weakref.finalize | None = None
        self.peak_pages = 0  # most pages held at once during the last `expand`
        self.cached_tokens = 0  # prompt tokens served from injected pages during the last `expand`
        self.prefilled_tokens = 0  # prompt tokens eSurge computed itself during the last `expand`

    def start(self) -> ESurgeEngine:
        if self._engine is not None:
            return self
        reason = unsupported_reason(self.model)
        if reason:
            raise internals.ESurgeUnavailable(f"eSurge cannot branch from injected snapshots: {reason}")
        config = self.model.config.get_text_config()
        max_len = self.options.max_model_len or min(int(getattr(config, "max_position_embeddings", 2048)), 2048)
        self._engine = internals.start(
            self.model,
            self._tokenizer_folder(),
            page_size=self.options.page_size,
            page_budget_bytes=self.options.budget_bytes(),
            max_model_len=max_len,
            max_num_seqs=self.options.max_num_seqs,
        )
        self._finalizer = weakref.finalize(self, _shutdown, self._engine, self._folder)
        atexit.register(self._finalizer)
        return self

    def _tokenizer_folder(self) -> str:
        if isinstance(self.tokenizer, (str, Path)):
            return str(self.tokenizer)
        if self.tokenizer is None:
            raise ValueError("the eSurge engine needs the policy's tokenizer (a tokenizer object or its folder)")
        self._folder = tempfile.TemporaryDirectory(prefix="vinekv-esurge-tok-")
        self.tokenizer.save_pretrained(self._folder.name)
        return self._folder.name

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
            atexit.unregister(self._finalizer)
        self._engine, self._finalizer, self._folder = None, None, None

    @property
    def esurge(self) -> Any:
        """The running ``easydel.inference.esurge.eSurge`` (starts the engine if needed)."""
        return self.start()._engine

    def update_model(self, model: Any) -> None:
        self.model = model
        if self._engine is not None:
            internals.update_weights(self._engine, model)

    def expand(
        self,
        states: Sequence[CachedState],
        sampling: BranchSampling,
        keys: np.ndarray,
        budgets: np.ndarray,
        tokenizer: Any = None,
    ) -> list[Branches]:
        if sampling.sampler != "esurge" and sampling.top_p < 1 and sampling.temperature not in (0.0, 1.0):
            raise ValueError(
                "the eSurge engine applies top-p before the temperature (sampler='esurge'); with "
                f"temperature {sampling.temperature} and top_p {sampling.top_p} that differs from "
                "sampler='generate': pass sampler='esurge' or use engine='vanilla'"
            )
        layout = kv_layout(self.model)
        for state in states:
            state.layout.check_compatible(layout)
        engine = self.esurge
        self.peak_pages = self.cached_tokens = self.prefilled_tokens = 0
        per_batch = max(1, self.options.max_num_seqs // sampling.k)
        out: list[Branches] = []
        for start in range(0, len(states), per_batch):
            stop = min(start + per_batch, len(states))
            out.extend(
                self._run_batch(
                    engine, states[start:stop], sampling, keys[start * sampling.k], budgets[start:stop], tokenizer
                )
            )
        return out

    def _run_batch(self, engine, states, sampling, key, budgets, tokenizer) -> list[Branches]:
        from easydel.inference.sampling_params import SamplingParams

        internals.reset_prefix_cache(engine)
        internals.reset_batch_state(engine, key)
        size = internals.page_size(engine)
        held, requests = [], []
        for s, (state, budget) in enumerate(zip(states, budgets, strict=True)):
            tokens = state.token_ids[0]
            injected = (state.position - 1) // size * size  # eSurge always recomputes the last token
            held.append(internals.inject(engine, tokens, state.keys[:, 0, :injected], state.values[:, 0, :injected]))
            params = SamplingParams(
                n=1,
                max_tokens=int(budget),
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                stop_token_ids=sorted(sampling.eos_ids | sampling.stop_ids),
            )
            requests += [internals.request(f"s{s}-b{b}", tokens, params) for b in range(sampling.k)]

        def sample_pages() -> None:
            self.peak_pages = max(self.peak_pages, internals.pages_in_use(engine))

        try:
            sample_pages()
            done = internals.run(engine, requests, on_step=sample_pages)
        finally:
            for pages in held:
                internals.release(engine, pages)
        out = []
        for s, state in enumerate(states):
            lengths, reasons, tokens = [], [], []
            for b in range(sampling.k):
                finished = done[f"s{s}-b{b}"]
                self.cached_tokens += finished.cached_tokens
                self.prefilled_tokens += state.position - finished.cached_tokens
                seq = np.asarray(finished.tokens, np.int32)
                reason = (sampling.end_reason(int(seq[-1])) if len(seq) else None) or "length"
                length, reason = cut_at_stop_strings(seq, len(seq), reason, sampling, tokenizer)
                lengths.append(length)
                reasons.append(reason)
                tokens.append(seq[:length].copy())
            out.append(Branches(tokens=tokens, lengths=np.asarray(lengths), finish_reasons=reasons, logprobs=None))
        return out


def _shutdown(engine: Any, folder: tempfile.TemporaryDirectory | None) -> None:
    internals.shutdown(engine)
    if folder is not None:
        folder.cleanup()
