"""Settings validation and document reading of the evaluator."""

from __future__ import annotations

import logging

import pytest

from worker.evaluate import DocumentError, PplConfig, read_text, tokenize_documents
from worker.evaluate.documents import unique_names
from worker.exceptions import ConfigError


@pytest.mark.parametrize(
    "settings",
    [
        {"modes": ("dense", "bogus")},
        {"modes": ()},
        {"cache_tokens": 0},
        {"sink_tokens": 8, "cache_tokens": 8},
        {"sink_tokens": -1},
        {"sample_stride": 0},
        {"event_tokens": 64, "cache_tokens": 32, "sink_tokens": 4},
        {"max_tokens": 0},
        {"warmup_tokens": -1},
    ],
)
def test_config_invalid_value_raises(settings):
    with pytest.raises(ConfigError):
        PplConfig(**settings)


def test_config_window_tokens_excludes_sinks():
    assert PplConfig(cache_tokens=1024, sink_tokens=4).window_tokens == 1020


def test_read_text_invalid_utf8_replaced(tmp_path, caplog):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ok".encode("latin-1"))

    with caplog.at_level(logging.WARNING):
        text = read_text(path)

    assert text == "caf\ufffd ok"
    assert "not valid UTF-8" in caplog.text


def test_read_text_empty_file_is_empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")

    assert read_text(path) == ""


def test_tokenize_documents_short_ones_skipped(tokenizer):
    documents, skipped = tokenize_documents(
        [("empty", ""), ("one", "a"), ("two", "ab"), ("long", "hello world")], tokenizer, max_tokens=None
    )

    assert [document.name for document in documents] == ["two", "long"]
    assert [item.name for item in skipped] == ["empty", "one"]


def test_tokenize_documents_max_tokens_truncates(tokenizer):
    documents, _ = tokenize_documents([("long", "hello world")], tokenizer, max_tokens=4)

    assert len(documents[0].token_ids) == 4


def test_tokenize_documents_all_short_raises(tokenizer):
    with pytest.raises(DocumentError):
        tokenize_documents([("empty", ""), ("one", "a")], tokenizer, max_tokens=None)


def test_unique_names_colliding_stems_get_parent(tmp_path):
    paths = [tmp_path / "a" / "book.txt", tmp_path / "b" / "book.txt", tmp_path / "c.txt"]

    assert unique_names(paths) == ["a/book", "b/book", "c"]
