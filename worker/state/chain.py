"""Descriptions of stored records and of the chains that make up a stream's snapshot."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Bounds of StateConfig.chunk_max_bytes, which uses these constants. A stored record may have been written with any
# allowed chunk size, so its chunk count must lie between the counts these two give.
MIN_CHUNK_BYTES = 64 * 1024
MAX_CHUNK_BYTES = 512 * 1024 * 1024

_RECORD_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_RECORD_KINDS = ("base", "delta")


class InvalidChainError(ValueError):
    """Chain JSON that does not describe a valid chain. The message names the field and the value."""


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
        """Parse and validate chain JSON; raises :class:`InvalidChainError` naming what is wrong.

        Every record's ``num_chunks`` must fit its ``num_bytes`` for some allowed chunk
        size, so a damaged or forged record cannot make a reader build millions of key
        names.
        """
        try:
            data = json.loads(text)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidChainError(f"invalid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise InvalidChainError(f"expected a JSON object, got {type(data).__name__}")
        _check_keys(data, {item.name for item in fields(cls)}, {"records", "stream_id"}, "chain")
        records = data["records"]
        if not isinstance(records, list) or not records:
            raise InvalidChainError(f"field 'records' must be a non-empty list, got {_short(records)}")
        data["records"] = [_record_from_dict(ref, index) for index, ref in enumerate(records)]
        _check_type(data, "stream_id", str)
        _check_type(data, "topic", str, optional=True)
        for name in ("partition", "last_offset", "tokens_written"):
            _check_type(data, name, int, optional=name != "tokens_written")
        _check_type(data, "created_at", (int, float))
        _check_type(data, "extra", dict)
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


def expected_chunk_range(num_bytes: int) -> tuple[int, int]:
    """Return the minimum and maximum number of chunks a record of ``num_bytes`` bytes can be stored in."""
    if num_bytes == 0:
        return 1, 1
    return math.ceil(num_bytes / MAX_CHUNK_BYTES), math.ceil(num_bytes / MIN_CHUNK_BYTES)


def _record_from_dict(value: Any, index: int) -> RecordRef:
    where = f"records[{index}]"
    if not isinstance(value, dict):
        raise InvalidChainError(f"{where} must be a JSON object, got {_short(value)}")
    names = {item.name for item in fields(RecordRef)}
    _check_keys(value, names, names, where)
    record_id, kind, num_chunks, num_bytes = (value[name] for name in ("record_id", "kind", "num_chunks", "num_bytes"))
    if not isinstance(record_id, str) or not _RECORD_ID.fullmatch(record_id):
        raise InvalidChainError(f"{where}.record_id {_short(record_id)} is not 1 to 64 letters, digits, '-' or '_'")
    if kind not in _RECORD_KINDS:
        raise InvalidChainError(f"{where}.kind {_short(kind)} is not 'base' or 'delta'")
    for name, number in (("num_chunks", num_chunks), ("num_bytes", num_bytes)):
        if not _is_int(number) or number < 0:
            raise InvalidChainError(f"{where}.{name} {_short(number)} is not a non-negative integer")
    fewest, maximum = expected_chunk_range(num_bytes)
    if not fewest <= num_chunks <= maximum:
        raise InvalidChainError(
            f"{where}.num_chunks {num_chunks} cannot hold num_bytes {num_bytes}: chunks of "
            f"{MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} bytes give {fewest} to {maximum} chunks"
        )
    return RecordRef(record_id=record_id, kind=kind, num_chunks=num_chunks, num_bytes=num_bytes)


def _check_keys(data: dict[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidChainError(f"{where} has unknown field {_short(unknown[0])}")
    missing = sorted(required - set(data))
    if missing:
        raise InvalidChainError(f"{where} is missing field {missing[0]!r}")


def _check_type(data: dict[str, Any], name: str, kind: type | tuple[type, ...], optional: bool = False) -> None:
    if name not in data or (optional and data[name] is None):
        return
    value = data[name]
    expected = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, expected):
        names = " or ".join(item.__name__ for item in expected)
        raise InvalidChainError(f"field {name!r} must be {names}{' or null' if optional else ''}, got {_short(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    """Return ``value`` as an ASCII repr of at most 60 characters, safe to print or log."""
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."
