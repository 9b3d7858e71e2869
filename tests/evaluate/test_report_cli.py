"""Summary figures, output files and the ``sinkstream ppl`` / ``data fetch`` commands."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from worker.cli import main
from worker.evaluate import Document, ModeResult, PplConfig, RunResult, build_summary


def _run(nll_by_mode: dict[str, np.ndarray], config: PplConfig) -> RunResult:
    length = len(next(iter(nll_by_mode.values())))
    modes = {
        mode: ModeResult(mode, [nll], elapsed_s=2.0, scored_tokens=int(np.isfinite(nll).sum()),
                         peak_memory_bytes=1, memory_kind="sampled_rss")
        for mode, nll in nll_by_mode.items()
    }
    return RunResult(config, [Document("doc", list(range(length)))], modes, "tiny", 256)


def test_summary_sampled_and_segments_use_same_positions():
    nll = np.full(10, np.nan, dtype=np.float32)
    nll[1:] = [1.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 3.0, 1.0]
    config = PplConfig(modes=("dense",), sample_stride=4, segment_tokens=5)
    summary = build_summary(_run({"dense": nll}, config))
    figures = summary["documents"][0]["modes"]["dense"]

    assert figures["tokens"] == 9
    assert figures["mean_nll"] == pytest.approx(13 / 9, abs=1e-4)
    assert figures["sampled"]["tokens"] == 2
    assert figures["sampled"]["perplexity"] == pytest.approx(math.exp(3.0), rel=1e-4)
    assert [segment["start"] for segment in figures["segments"]] == [0, 5]
    assert figures["segments"][0]["perplexity"] == pytest.approx(math.exp(1.5), rel=1e-4)
    assert summary["modes"]["dense"]["tokens_per_s"] == pytest.approx(4.5)


def test_summary_head_tail_compares_spans():
    nll = np.full(21, 1.0, dtype=np.float32)
    nll[0] = np.nan
    nll[-5:] = 2.0
    config = PplConfig(modes=("streaming",), compare_tokens=5, warmup_tokens=3)
    head_tail = build_summary(_run({"streaming": nll}, config))["documents"][0]["modes"]["streaming"]["head_tail"]

    assert head_tail["head_perplexity"] == pytest.approx(math.e, rel=1e-4)
    assert head_tail["tail_perplexity"] == pytest.approx(math.exp(2.0), rel=1e-4)
    assert head_tail["tail_over_head"] == pytest.approx(math.e, rel=1e-4)


def test_ppl_command_writes_outputs(tmp_path, model_dir, capsys):
    (tmp_path / "a.txt").write_text("It was the best of times, it was the worst of times. " * 3)
    (tmp_path / "b.txt").write_bytes(b"Call me \xffIshmael. Some years ago, never mind how long.")
    (tmp_path / "empty.txt").write_bytes(b"")
    out = tmp_path / "out"

    code = main([
        "--log-level", "WARNING", "ppl", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
        str(tmp_path / "empty.txt"), "--model", str(model_dir), "--cache-tokens", "32",
        "--sample-stride", "8", "--segment-tokens", "40", "--out", str(out), "--no-progress",
    ])

    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [document["name"] for document in summary["documents"]] == ["a", "b"]
    assert summary["skipped"][0]["name"] == "empty"
    assert set(summary["documents"][0]["modes"]) == {"dense", "window", "recompute", "streaming"}
    arrays = np.load(out / "nll.npz")
    assert sorted(arrays.files) == sorted(f"{doc}/{mode}" for doc in "ab"
                                          for mode in ("dense", "window", "recompute", "streaming"))
    assert (out / "ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert "streaming" in capsys.readouterr().out


def test_ppl_command_unfetched_dataset_fails(tmp_path, monkeypatch, model_dir, capsys):
    monkeypatch.setenv("SINKSTREAM_HOME", str(tmp_path))

    status = main(["ppl", "moby-dick", "--model", str(model_dir), "--out", str(tmp_path / "out")])
    assert status == 2
    assert "sinkstream data fetch moby-dick" in capsys.readouterr().err
