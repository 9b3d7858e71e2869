"""Perplexity evaluation of dense, window, recompute and streaming (sinks + window) attention."""

from worker.evaluate.config import MODES, PplConfig
from worker.evaluate.documents import Document, DocumentError, read_text, tokenize_documents
from worker.evaluate.report import build_summary, plot_log_perplexity, write_nll, write_summary
from worker.evaluate.runner import ModeResult, RunResult, run_modes

__all__ = [
    "MODES", "PplConfig", "Document", "DocumentError", "read_text", "tokenize_documents",
    "build_summary", "plot_log_perplexity", "write_nll", "write_summary",
    "ModeResult", "RunResult", "run_modes",
]
