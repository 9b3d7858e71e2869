"""Run the perplexity table: modes, sink ablation, cache sizes and the million-token stream.

Each row is one evaluator run on SmolLM2-135M-Instruct; its summary.json, nll.npz and
ppl.png go to ``<out>/table<N>/<row>/`` and a Markdown table to ``<out>/table<N>.md``.
Budgets are arguments so the same script serves a CPU spot check and a full GPU run:

    python benchmarks/ppl_table.py --table 1 --max-tokens 2048 --sample-stride 32
    python benchmarks/ppl_table.py --table 4 --event-tokens 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from worker.data import dataset_path, fetch_datasets
from worker.engine.models import load_model
from worker.evaluate import Document, ModeResult, PplConfig, RunResult, build_summary, plot_log_perplexity, run_modes, write_nll, write_summary
from worker.evaluate.documents import read_text, tokenize_documents
from worker.paths import default_model_dir

logger = logging.getLogger("ppl_table")

TABLE_HEADER = (
    "| row | mode | cache | sinks | tokens | ppl | sampled tokens | ppl | tokens after slide | ppl "
    "| sampled after slide | ppl | tokens/s |"
)
PAPER_TABLE_1 = "Llama-2-13B in the paper: window 5158, recompute 5.43, sinks 5.40"
PAPER_TABLE_2 = "Llama-2-7B in the paper, 0/1/2/4/8 sinks: 3359.95, 11.88, 10.51, 9.59, 9.54"


def table_rows(table: int, base: PplConfig) -> list[tuple[str, PplConfig]]:
    """Return the (row name, settings) pairs of one table."""
    if table == 1:
        # One row per mode, cheapest first, so a run cut short still keeps its finished rows.
        return [
            (mode, replace(base, modes=(mode,), cache_tokens=1024, sink_tokens=4))
            for mode in ("streaming", "window", "dense", "recompute")
        ]
    if table == 2:
        return [
            (f"sinks-{sinks}", replace(base, modes=("streaming",), cache_tokens=1024, sink_tokens=sinks))
            for sinks in (0, 1, 2, 4, 8)
        ]
    if table == 3:
        return [
            (f"cache-{cache}", replace(base, modes=("streaming", "recompute"), cache_tokens=cache, sink_tokens=4))
            for cache in (256, 512, 1024, 2048)
        ]
    return [("million", replace(base, modes=("streaming",), cache_tokens=1024, sink_tokens=4))]


def load_text(table: int, out: Path) -> tuple[str, str]:
    """Return (name, text): Moby-Dick, or for table 4 the State of the Union addresses then Moby-Dick."""
    fetch_datasets(["moby-dick", "sotu"])
    moby_dick = read_text(dataset_path("moby-dick"))
    if table != 4:
        return "moby-dick", moby_dick
    return "sotu+moby-dick", read_text(dataset_path("sotu")) + "\n\n" + moby_dick


def split_document(document: Document, num_streams: int) -> list[Document]:
    """Cut ``document`` into ``num_streams`` consecutive pieces of equal length (the remainder is dropped)."""
    if num_streams == 1:
        return [document]
    length = len(document.token_ids) // num_streams
    return [
        Document(f"{document.name}[{index}]", document.token_ids[index * length : (index + 1) * length])
        for index in range(num_streams)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=int, choices=(1, 2, 3, 4), required=True)
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: fetched SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens of the text to use (default: all)")
    parser.add_argument("--sample-stride", type=int, default=64, help="recompute scores every k-th position")
    parser.add_argument("--event-tokens", type=int, default=1, help="tokens per engine event (default 1)")
    parser.add_argument("--dense-max-tokens", type=int, default=None, help="dense mode token limit")
    parser.add_argument("--segment-tokens", type=int, default=1000, help="per-segment perplexity bin width")
    parser.add_argument("--compare-tokens", type=int, default=100_000, help="table 4: compared span length")
    parser.add_argument("--warmup-tokens", type=int, default=10_000, help="table 4: positions before the first span")
    parser.add_argument("--split-streams", type=int, default=1,
                        help="cut the first --max-tokens tokens into this many equal documents, run as concurrent streams")
    parser.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    parser.add_argument("--plot-only", action="store_true",
                        help="only redraw <out>/table<N>.png from the rows already in <out>/table<N>/")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    base = PplConfig(
        sample_stride=args.sample_stride, max_tokens=args.max_tokens, event_tokens=args.event_tokens,
        dense_max_tokens=args.dense_max_tokens, segment_tokens=args.segment_tokens,
        compare_tokens=args.compare_tokens if args.table == 4 else None,
        warmup_tokens=args.warmup_tokens if args.table == 4 else 0,
    )
    table_dir = args.out / f"table{args.table}"
    if args.plot_only:
        plot_rows(table_dir, args.out / f"table{args.table}.png")
        return 0
    loaded = load_model(args.model or default_model_dir(), device=args.device)
    name, text = load_text(args.table, args.out)
    documents, _ = tokenize_documents([(name, text)], loaded.tokenizer, args.max_tokens)
    documents = split_document(documents[0], args.split_streams)
    wanted = set(args.rows.split(",")) if args.rows else None
    lines = []
    for row, config in table_rows(args.table, base):
        if wanted and row not in wanted:
            continue
        row_dir = table_dir / row
        row_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        run = run_modes(loaded, documents, config)
        summary = build_summary(run)
        summary["wall_s"] = round(time.perf_counter() - started, 1)
        write_summary(summary, row_dir / "summary.json")
        write_nll(run, row_dir / "nll.npz")
        plot_log_perplexity(run, row_dir / "ppl.png")
        lines.extend(markdown_rows(row, summary))
        logger.info("row %s done in %.0f s", row, summary["wall_s"])
        reference = {1: PAPER_TABLE_1, 2: PAPER_TABLE_2}.get(args.table)
        table = "\n".join([TABLE_HEADER, "|" + "---|" * 13, *lines, *([f"\nFor reference: {reference}."] if reference else [])])
        (args.out / f"table{args.table}.md").write_text(table + "\n")
    plot_rows(table_dir, args.out / f"table{args.table}.png")
    print(table)
    return 0


def plot_rows(table_dir: Path, path: Path) -> None:
    """Draw every row's modes of one table in a single plot, one line per row and mode.

    The rows must share their documents (same text, token budget and stream split).
    """
    modes, documents, config, trained_positions = {}, None, None, None
    for row_dir in sorted(p for p in table_dir.iterdir() if (p / "nll.npz").exists()):
        summary = json.loads((row_dir / "summary.json").read_text())
        arrays = np.load(row_dir / "nll.npz")
        names = [document["name"] for document in summary["documents"]]
        settings = summary["config"]
        settings["modes"] = tuple(settings["modes"])
        config = config or PplConfig(**settings)
        trained_positions = summary["trained_positions"]
        documents = documents or [Document(name, [0] * document["tokens"])
                                  for name, document in zip(names, summary["documents"])]
        for mode in settings["modes"]:
            label = mode if row_dir.name == mode else f"{row_dir.name} {mode}"
            nll = [arrays[f"{name}/{mode}"] for name in names]
            modes[label] = ModeResult(label, nll, 0.0, 0, 0, "")
    if not modes:
        raise SystemExit(f"no finished rows under {table_dir}")
    run = RunResult(config, documents, modes, "", trained_positions)
    plot_log_perplexity(run, path, pooled=True, title=f"{table_dir.name}, cache {config.cache_tokens}")
    logger.info("plot written to %s", path)


def markdown_rows(row: str, summary: dict) -> list[str]:
    """Return one Markdown row per mode, pooled over all streams of the run."""
    config = summary["config"]
    lines = []
    for mode, figures in summary["overall"].items():
        sinks = config["sink_tokens"] if mode == "streaming" else 0
        cells = [row, mode, config["cache_tokens"], sinks]
        for pool in ("all", "sampled", "slid", "slid_sampled"):
            cells += [figures[pool]["tokens"], _fmt(figures[pool]["perplexity"])]
        cells.append(f"{summary['modes'][mode]['tokens_per_s']:.2f}")
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    for document in summary["documents"]:
        for mode, figures in document["modes"].items():
            if "head_tail" in figures:
                lines.append(f"| {row} | {mode} head/tail | {json.dumps(figures['head_tail'])} |")
    return lines


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
