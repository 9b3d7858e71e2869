"""Descriptions of stored records and of the chains that make up a stream's snapshot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RecordRef:
    """One stored record: its id, kind, how many chunk keys hold it and its size."""

    record_id: str
    kind: str
    num_chunks: int
    num_bytes: int


@dataclass
class Chain:
    """A base record and its deltas, plus the stream's position when the last one was made.

    ``last_offset`` is the offset of the last event the chain contains on ``topic`` /
    ``partition``; ``tokens_written`` counts the tokens written into the cache since the
    stream started or was reset, which decides the slots of the next delta.
    """

    records: list[RecordRef]
    stream_id: str
    topic: str | None = None
    partition: int | None = None
    last_offset: int | None = None
    tokens_written: int = 0
    created_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_bytes(self) -> int:
        return self.records[0].num_bytes if self.records else 0

    @property
    def delta_bytes(self) -> int:
        return sum(ref.num_bytes for ref in self.records[1:])

    @property
    def num_bytes(self) -> int:
        return sum(ref.num_bytes for ref in self.records)

    def record_ids(self) -> set[str]:
        return {ref.record_id for ref in self.records}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Chain:
        data = json.loads(text)
        data["records"] = [RecordRef(**ref) for ref in data["records"]]
        return cls(**data)


def obsolete_records(old: Chain | None, *keep: Chain | None) -> list[RecordRef]:
    """Return the records of ``old`` that none of the ``keep`` chains references."""
    if old is None:
        return []
    kept_ids: set[str] = set()
    for chain in keep:
        if chain is not None:
            kept_ids |= chain.record_ids()
    return [ref for ref in old.records if ref.record_id not in kept_ids]
