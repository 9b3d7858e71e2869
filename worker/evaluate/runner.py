"""Running every requested mode over the same documents and timing each one."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from worker.evaluate import scorers
from worker.evaluate.config import PplConfig
from worker.evaluate.documents import Document

logger = logging.getLogger(__name__)


@dataclass
class ModeResult:
    """Measurements of one mode: per-position NLL for each document, time and memory."""

    mode: str
    nll: list[np.ndarray]
    elapsed_s: float
    scored_tokens: int
    peak_memory_bytes: int
    memory_kind: str
    memory_trace: list[tuple[int, int]] = field(default_factory=list)
    """(tokens consumed per stream, memory in bytes) after each engine call."""
    note: str = ""


@dataclass
class RunResult:
    config: PplConfig
    documents: list[Document]
    modes: dict[str, ModeResult]
    model_source: str
    trained_positions: int | None
    device: str = ""


def run_modes(loaded: Any, documents: list[Document], config: PplConfig, progress_bar: bool = True) -> RunResult:
    """Score ``documents`` in every mode of ``config``, one mode after another.

    ``loaded`` is a :class:`worker.engine.models.LoadedModel`; dense and recompute use
    its transformers model directly, window and streaming go through the engine.
    """
    trained_positions = getattr(getattr(loaded, "spec", None), "max_positions", None)
    results = {}
    for mode in config.modes:
        logger.info("scoring %d document(s) in %s mode", len(documents), mode)
        results[mode] = _run_mode(mode, loaded, documents, config, trained_positions, progress_bar)
        result = results[mode]
        logger.info(
            "%s mode scored %d positions in %.1f s (%.1f tokens/s)",
            mode, result.scored_tokens, result.elapsed_s, result.scored_tokens / max(result.elapsed_s, 1e-9),
        )
    device = str(getattr(loaded, "device", ""))
    return RunResult(config, documents, results, str(getattr(loaded, "source", "")), trained_positions, device)


def dense_token_limit(config: PplConfig, trained_positions: int | None, num_tokens: int) -> int:
    """Return how many leading tokens dense mode scores for a document of ``num_tokens``."""
    if config.dense_max_tokens is not None:
        return min(num_tokens, config.dense_max_tokens)
    if trained_positions:
        return min(num_tokens, 2 * trained_positions)
    return num_tokens


def _run_mode(
    mode: str, loaded: Any, documents: list[Document], config: PplConfig,
    trained_positions: int | None, progress_bar: bool,
) -> ModeResult:
    memory = _MemoryProbe(loaded.model)
    total = _progress_total(mode, documents, config, trained_positions)
    started = time.perf_counter()
    with tqdm(total=total, desc=mode, unit="tok", disable=not progress_bar, dynamic_ncols=True) as bar:
        def progress(count: int) -> None:
            bar.update(count)
            memory.sample()

        if mode == "dense":
            nll, note = [], ""
            for document in documents:
                limit = dense_token_limit(config, trained_positions, len(document.token_ids))
                nll.append(scorers.score_dense(loaded.model, document, limit, config.dense_chunk_tokens, progress))
                if limit < len(document.token_ids):
                    note = f"dense scores the first {limit} tokens of each document only"
        elif mode == "recompute":
            nll = scorers.score_recompute(loaded.model, documents, config, progress)
            note = f"every {config.sample_stride}th position only" if config.sample_stride > 1 else ""
        else:
            sink_tokens = config.sink_tokens if mode == "streaming" else 0
            nll = scorers.score_engine(
                loaded, documents, config, sink_tokens, progress, on_call=memory.trace_point
            )
            note = ""
    elapsed = time.perf_counter() - started
    scored = int(sum(np.isfinite(values).sum() for values in nll))
    return ModeResult(
        mode, nll, elapsed, scored, memory.peak, memory.kind, memory.trace, note
    )


def _progress_total(mode: str, documents: list[Document], config: PplConfig, trained_positions: int | None) -> int:
    if mode == "recompute":
        return sum(len(scorers.sampled_positions(len(d.token_ids), config.sample_stride)) for d in documents)
    if mode == "dense":
        return sum(dense_token_limit(config, trained_positions, len(d.token_ids)) for d in documents)
    return sum(len(d.token_ids) for d in documents)


class _MemoryProbe:
    """Peak accelerator memory on CUDA, else the process's resident set size, sampled."""

    def __init__(self, model: Any) -> None:
        self.device = getattr(model, "device", torch.device("cpu"))
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "sampled_rss"
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peak = 0
        self.trace: list[tuple[int, int]] = []
        self.sample()

    def current(self) -> int:
        if self.kind == "cuda_max_allocated":
            return int(torch.cuda.memory_allocated(self.device))
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sample(self) -> None:
        if self.kind == "cuda_max_allocated":
            self.peak = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak = max(self.peak, self.current())

    def trace_point(self, tokens_consumed: int) -> None:
        self.trace.append((tokens_consumed, self.current()))
