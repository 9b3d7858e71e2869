"""``sinkstream generate`` on the real model, on a text file."""

import json
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True, timeout=600)


def test_generate_cli_file_prints_reply(tmp_path):
    text = tmp_path / "note.txt"
    # The file is continued as text, so it ends mid-sentence to leave the model words to add.
    text.write_text("The meeting moved to Thursday at noon, and everyone in the office")
    result = run_cli("generate", "--file", str(text), "--max-new-tokens", "4", "--window-tokens", "124",
                     "--json-lines")
    assert result.returncode == 0, result.stderr
    (line,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert line["stream_id"] == "note"
    assert line["finish_reason"] == "length"
    assert line["generated_tokens"] == 4
    assert line["error"] is None


def test_generate_cli_out_of_range_conversations_rejected():
    result = run_cli("generate", "--conversations", "81")
    assert result.returncode == 2
    assert "--conversations 81 is out of range: use 1 to 80" in result.stderr


def test_generate_cli_invalid_window_rejected(tmp_path):
    text = tmp_path / "note.txt"
    text.write_text("hello")
    result = run_cli("generate", "--file", str(text), "--window-tokens", "0")
    assert result.returncode == 2
    assert "invalid window_tokens=0" in result.stderr
