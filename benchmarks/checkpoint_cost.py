"""Throughput cost of checkpointing with Redis snapshots, on the demo workload.

Runs ``sinkstream demo`` (all 80 MT-Bench conversations and 4 Moby-Dick chapters by
default) in pairs, alternating ``--checkpoint-store redis`` (snapshots at the default
checkpoint interval) and ``--checkpoint-store none`` (offsets only). Each run starts its
own broker and Redis. Throughput is prompt plus generated tokens over the worker's busy
time (first fetched event to last output), so model loading and the group join are not
counted. Prints each pair and the median ratio redis/none, and writes them as JSON.

    python benchmarks/checkpoint_cost.py --pairs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_demo(store: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "summary.json"
        command = [sys.executable, "-m", "worker.cli", "demo", "--quiet", "--checkpoint-store", store,
                   "--json", str(path), *extra]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0 or not path.exists():
            raise SystemExit(f"demo with --checkpoint-store {store} failed (exit {completed.returncode}):\n"
                             f"{completed.stdout[-2000:]}\n{completed.stderr[-2000:]}")
        return json.loads(path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="redis/none pairs to run (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    parser.add_argument("demo_args", nargs="*", help="extra arguments for sinkstream demo, after --")
    args = parser.parse_args()

    pairs = []
    for index in range(args.pairs):
        # Alternate which run goes first, so a drift in machine load hits both alike.
        order = ("redis", "none") if index % 2 == 0 else ("none", "redis")
        runs = {store: run_demo(store, args.demo_args) for store in order}
        ratio = runs["redis"]["tokens_per_s"] / runs["none"]["tokens_per_s"]
        pairs.append({"redis": runs["redis"], "none": runs["none"], "ratio": ratio})
        print(f"pair {index + 1}: redis {runs['redis']['tokens_per_s']:.0f} tokens/s "
              f"({runs['redis']['worker_seconds']:.1f} s), none {runs['none']['tokens_per_s']:.0f} tokens/s "
              f"({runs['none']['worker_seconds']:.1f} s), ratio {ratio:.3f}", flush=True)
    median = statistics.median(pair["ratio"] for pair in pairs)
    print(f"median throughput with snapshots over without: {median:.3f} "
          f"({(1 - median) * 100:.1f} % cost; target at most 10 %)")
    if args.json is not None:
        args.json.write_text(json.dumps({"pairs": pairs, "median_ratio": median}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
