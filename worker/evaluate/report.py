"""The outputs of a perplexity run: JSON summary, per-token NLL file and plot."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.evaluate.documents import SkippedDocument
from worker.evaluate.runner import ModeResult, RunResult
from worker.evaluate.scorers import mean_nll, sampled_positions


def perplexity(nll: float) -> float:
    return math.exp(nll) if math.isfinite(nll) else math.nan


def build_summary(run: RunResult, skipped: list[SkippedDocument] = ()) -> dict[str, Any]:
    """Summarise each mode per document: full-stream and sampled-position figures, segments."""
    config = run.config
    documents = []
    for doc_index, document in enumerate(run.documents):
        sample = sampled_positions(len(document.token_ids), config.sample_stride)
        modes = {
            name: _mode_summary(result, result.nll[doc_index], sample, run)
            for name, result in run.modes.items()
        }
        documents.append({"name": document.name, "tokens": len(document.token_ids), "modes": modes})
    return {
        "config": {key: (list(value) if isinstance(value, tuple) else value) for key, value in vars(config).items()},
        "model": run.model_source,
        "trained_positions": run.trained_positions,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": run.device,
        },
        "modes": {
            name: {
                "elapsed_s": round(result.elapsed_s, 3),
                "scored_tokens": result.scored_tokens,
                "tokens_per_s": round(result.scored_tokens / max(result.elapsed_s, 1e-9), 3),
                "peak_memory_bytes": result.peak_memory_bytes,
                "memory_kind": result.memory_kind,
                "memory_trace": result.memory_trace,
                "note": result.note,
            }
            for name, result in run.modes.items()
        },
        "overall": {name: _pooled_summary(result, run) for name, result in run.modes.items()},
        "documents": documents,
        "skipped": [{"name": item.name, "reason": item.reason} for item in skipped],
    }


def _mode_summary(result: ModeResult, nll: np.ndarray, sample: np.ndarray, run: RunResult) -> dict[str, Any]:
    config = run.config
    full = mean_nll(nll)
    sampled = mean_nll(nll[sample]) if sample.size else math.nan
    summary = {
        "tokens": int(np.isfinite(nll).sum()),
        "mean_nll": _round(full),
        "perplexity": _round(perplexity(full)),
        "sampled": {
            "stride": config.sample_stride,
            "tokens": int(np.isfinite(nll[sample]).sum()) if sample.size else 0,
            "mean_nll": _round(sampled),
            "perplexity": _round(perplexity(sampled)),
        },
        "segments": _segments(nll, config.segment_tokens),
    }
    if config.compare_tokens is not None:
        summary["head_tail"] = _head_tail(nll, config.warmup_tokens, config.compare_tokens)
    return summary


def _pooled_summary(result: ModeResult, run: RunResult) -> dict[str, Any]:
    """Pool all documents' positions: every scored one, the sample, and both once the cache is full.

    From about position ``cache_tokens`` on, window and streaming evict tokens and recompute
    truncates its context. Before that every mode sees the whole prefix, as dense does.
    """
    config = run.config
    pools: dict[str, list[np.ndarray]] = {"all": [], "sampled": [], "slid": [], "slid_sampled": []}
    for doc_index, document in enumerate(run.documents):
        nll = result.nll[doc_index]
        sample = sampled_positions(len(document.token_ids), config.sample_stride)
        pools["all"].append(nll)
        pools["sampled"].append(nll[sample])
        pools["slid"].append(nll[config.cache_tokens :])
        pools["slid_sampled"].append(nll[sample[sample >= config.cache_tokens]])
    figures = {}
    for name, parts in pools.items():
        values = np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)
        nll_mean = mean_nll(values)
        figures[name] = {"tokens": int(np.isfinite(values).sum()), "mean_nll": _round(nll_mean),
                         "perplexity": _round(perplexity(nll_mean))}
    return figures


def _segments(nll: np.ndarray, width: int) -> list[dict[str, Any]]:
    segments = []
    for start in range(0, len(nll), width):
        part = nll[start : start + width]
        count = int(np.isfinite(part).sum())
        if count:
            segments.append({"start": start, "end": start + len(part), "tokens": count,
                             "perplexity": _round(perplexity(mean_nll(part)))})
    return segments


def _head_tail(nll: np.ndarray, warmup: int, span: int) -> dict[str, Any]:
    """Compare positions [warmup, warmup + span) with the last ``span`` positions."""
    head, tail = nll[warmup : warmup + span], nll[max(warmup, len(nll) - span) :]
    head_ppl, tail_ppl = perplexity(mean_nll(head)), perplexity(mean_nll(tail))
    return {
        "warmup_tokens": warmup,
        "span_tokens": span,
        "head_perplexity": _round(head_ppl),
        "tail_perplexity": _round(tail_ppl),
        "tail_over_head": _round(tail_ppl / head_ppl) if head_ppl else None,
    }


def _round(value: float) -> float | None:
    return None if not math.isfinite(value) else round(value, 4)


def write_summary(summary: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")


def write_nll(run: RunResult, path: Path) -> None:
    """Write per-position NLL as ``.npz``: one float32 array per ``<document>/<mode>``, NaN where unscored."""
    arrays = {
        f"{document.name}/{mode}": result.nll[doc_index]
        for doc_index, document in enumerate(run.documents)
        for mode, result in run.modes.items()
    }
    with path.open("wb") as handle:
        np.savez_compressed(handle, **arrays)


def plot_log_perplexity(run: RunResult, path: Path, pooled: bool = False, title: str | None = None) -> None:
    """Plot log-perplexity (mean NLL per segment) against tokens processed.

    One panel per document, or with ``pooled`` a single panel whose segments pool the
    same positions of every document. ``title`` replaces the cache and sink settings in
    the panel titles, for plots whose lines come from runs with different settings.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = run.config.segment_tokens
    panels = _plot_panels(run, pooled)
    figure, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), squeeze=False)
    for axis, (panel_title, doc_indices, num_tokens) in zip((row[0] for row in axes), panels):
        for mode, result in run.modes.items():
            centers, values = [], []
            for start in range(0, num_tokens, width):
                parts = [result.nll[index][start : start + width] for index in doc_indices]
                value = mean_nll(np.concatenate(parts))
                if math.isfinite(value):
                    centers.append(start + width / 2)
                    values.append(value)
            style = "o--" if mode.endswith("recompute") and run.config.sample_stride > 1 else "-"
            axis.plot(centers, values, style, label=mode, markersize=3)
        if run.config.cache_tokens < num_tokens:
            axis.axvline(run.config.cache_tokens, color="black", linestyle=":", label="cache full")
        if run.trained_positions and run.trained_positions < num_tokens:
            axis.axvline(run.trained_positions, color="grey", linestyle="--", label="trained positions")
        settings = title or f"cache {run.config.cache_tokens}, {run.config.sink_tokens} sinks"
        axis.set_title(f"{panel_title} ({settings})")
        axis.set_xlabel("tokens processed")
        axis.set_ylabel(f"log perplexity (per {width} tokens)")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _plot_panels(run: RunResult, pooled: bool) -> list[tuple[str, list[int], int]]:
    """Return (title, document indices, tokens) for each panel of the plot."""
    lengths = [len(document.token_ids) for document in run.documents]
    if pooled and len(run.documents) > 1:
        return [(f"{len(run.documents)} streams pooled", list(range(len(lengths))), max(lengths))]
    return [(document.name, [index], lengths[index]) for index, document in enumerate(run.documents)]
