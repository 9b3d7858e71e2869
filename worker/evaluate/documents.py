"""Reading and tokenizing the documents of a perplexity run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from worker.exceptions import SinkstreamError

logger = logging.getLogger(__name__)


class DocumentError(SinkstreamError):
    """No document of a run can be scored."""


@dataclass(frozen=True)
class Document:
    """One text, tokenized; it becomes one stream of the run."""

    name: str
    token_ids: list[int]


@dataclass(frozen=True)
class SkippedDocument:
    name: str
    reason: str


def read_text(path: Path) -> str:
    """Read ``path`` as UTF-8, replacing invalid bytes with U+FFFD and warning once."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        logger.warning(
            "%s is not valid UTF-8 (first invalid byte at offset %d); %d characters replaced with U+FFFD",
            path,
            exc.start,
            text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd"),
        )
        return text


def tokenize_documents(
    named_texts: list[tuple[str, str]], tokenizer, max_tokens: int | None
) -> tuple[list[Document], list[SkippedDocument]]:
    """Tokenize each text without special tokens; skip those with fewer than two tokens.

    A text needs at least two tokens because the first token has nothing to be predicted from.
    """
    documents, skipped = [], []
    for name, text in named_texts:
        token_ids = list(tokenizer.encode(text, add_special_tokens=False)) if text else []
        if max_tokens is not None:
            token_ids = token_ids[:max_tokens]
        if len(token_ids) < 2:
            reason = f"{len(token_ids)} token(s); at least 2 are needed to score one"
            logger.warning("skipping document %s: %s", name, reason)
            skipped.append(SkippedDocument(name, reason))
            continue
        documents.append(Document(name, token_ids))
    if not documents:
        raise DocumentError(
            f"no document to score: all {len(named_texts)} input(s) are empty or shorter than 2 tokens"
        )
    return documents, skipped


def unique_names(paths: list[Path]) -> list[str]:
    """Name each path by its file stem, adding the parent folder where stems collide."""
    stems = [path.stem for path in paths]
    names = []
    for path, stem in zip(paths, stems):
        name = stem if stems.count(stem) == 1 else f"{path.parent.name}/{stem}"
        while name in names:
            name += "'"
        names.append(name)
    return names
