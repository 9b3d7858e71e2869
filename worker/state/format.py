"""Binary snapshot records: encoding, decoding, validation and chunking (no I/O).

A stream's snapshot is a chain of records: one ``base`` with the whole cache and
zero or more ``delta`` records with only the physical slots written since the
previous record. One record is laid out as::

    magic "SSNP" | format version u16 | header length u32 | body length u64
    | header (UTF-8 JSON) | body (K then V bytes) | CRC-32 u32 of everything before it

All integers are little-endian. The header names the model fingerprint, the engine
configuration, the stream metadata and, per tensor, its dtype, shape, codec and
byte lengths. K and V keep the cache dtype bit for bit. With byte shuffling, the
bytes of each element are regrouped by significance before compression, which
lets zstd find the repetitive sign and exponent bytes of floating-point values.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import zstandard

from worker.state.exceptions import SnapshotRejectedError

MAGIC = b"SSNP"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHIQ")
_CRC = struct.Struct("<I")

RecordKind = Literal["base", "delta"]


@dataclass
class SnapshotRecord:
    """One base or delta record of a stream's snapshot chain.

    ``keys`` and ``values`` are ``[num_layers, num_kv_heads, n, head_dim]``, where
    ``n`` is the cache capacity for a base and ``len(slots)`` for a delta.
    """

    kind: RecordKind
    fingerprint: str
    engine_config: dict[str, Any]
    metadata: dict[str, Any]
    keys: torch.Tensor
    values: torch.Tensor
    slots: list[int] | None = None

    def __post_init__(self) -> None:
        assert self.kind in ("base", "delta"), f"unknown record kind {self.kind!r}"
        assert self.keys.shape == self.values.shape, (
            f"K shape {tuple(self.keys.shape)} differs from V shape {tuple(self.values.shape)}"
        )
        assert self.keys.dim() == 4, f"K/V must be 4-D, got shape {tuple(self.keys.shape)}"
        if self.kind == "delta":
            assert self.slots is not None and len(self.slots) == self.keys.shape[2], (
                "a delta needs one slot index per K/V column"
            )


@dataclass
class EncodeStats:
    """Byte counts of one encoded record."""

    raw_bytes: int
    stored_bytes: int
    codecs: dict[str, str] = field(default_factory=dict)


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise SnapshotRejectedError("format", f"snapshot tensor has unknown dtype {name!r}")
    return dtype


def _tensor_to_bytes(tensor: torch.Tensor, shuffle: bool) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    as_bytes = flat.view(torch.uint8)
    itemsize = flat.element_size()
    if shuffle and itemsize > 1:
        as_bytes = as_bytes.reshape(-1, itemsize).t().contiguous()
    return as_bytes.numpy().tobytes()


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: list[int], shuffle: bool) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    as_bytes = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if shuffle and itemsize > 1:
        as_bytes = as_bytes.reshape(itemsize, -1).t().contiguous()
    return as_bytes.view(dtype).reshape(shape)


def _compress(raw: bytes, compression: str, level: int, min_gain: float) -> tuple[bytes, str]:
    if compression == "zstd" and raw:
        packed = zstandard.ZstdCompressor(level=level).compress(raw)
        if len(packed) <= len(raw) * (1.0 - min_gain):
            return packed, "zstd"
    return raw, "none"


def _decompress(data: bytes, codec: str, raw_len: int) -> bytes:
    if codec == "none":
        return data
    if codec == "zstd":
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_len)
    raise SnapshotRejectedError("format", f"snapshot tensor has unknown codec {codec!r}")


def encode_record(
    record: SnapshotRecord,
    compression: str = "zstd",
    level: int = 1,
    min_gain: float = 0.05,
    shuffle: bool = True,
) -> tuple[bytes, EncodeStats]:
    """Encode ``record`` into one checksummed byte string."""
    tensors_meta = []
    body_parts = []
    stats = EncodeStats(raw_bytes=0, stored_bytes=0)
    for name, tensor in (("keys", record.keys), ("values", record.values)):
        raw = _tensor_to_bytes(tensor, shuffle)
        stored, codec = _compress(raw, compression, level, min_gain)
        tensors_meta.append(
            {
                "name": name,
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "codec": codec,
                "shuffle": shuffle,
                "raw_len": len(raw),
                "stored_len": len(stored),
            }
        )
        body_parts.append(stored)
        stats.raw_bytes += len(raw)
        stats.stored_bytes += len(stored)
        stats.codecs[name] = codec
    header = {
        "kind": record.kind,
        "fingerprint": record.fingerprint,
        "engine_config": record.engine_config,
        "metadata": record.metadata,
        "slots": record.slots,
        "tensors": tensors_meta,
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = b"".join(body_parts)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header_bytes), len(body))
    checksum = zlib.crc32(body, zlib.crc32(header_bytes, zlib.crc32(prefix)))
    return b"".join((prefix, header_bytes, body, _CRC.pack(checksum))), stats


def _split(data: bytes | memoryview) -> tuple[memoryview, memoryview, memoryview]:
    """Validate framing and checksum; return the prefix, header and body views."""
    view = memoryview(data)
    if len(view) < 4 or bytes(view[:4]) != MAGIC:
        raise SnapshotRejectedError("format", "value is not a sinkstream snapshot (magic bytes missing)")
    if len(view) < _PREFIX.size + _CRC.size:
        raise SnapshotRejectedError("truncated", f"snapshot record is truncated at {len(view)} bytes")
    _, version, header_len, body_len = _PREFIX.unpack_from(view)
    if version != FORMAT_VERSION:
        raise SnapshotRejectedError(
            "format",
            f"snapshot format version {version} is not supported (this worker reads version "
            f"{FORMAT_VERSION}); rebuild the stream or delete the snapshot",
        )
    expected_len = _PREFIX.size + header_len + body_len + _CRC.size
    if len(view) != expected_len:
        raise SnapshotRejectedError(
            "truncated", f"snapshot record has {len(view)} bytes but its header declares {expected_len}"
        )
    (stored_crc,) = _CRC.unpack_from(view, expected_len - _CRC.size)
    if zlib.crc32(view[: expected_len - _CRC.size]) != stored_crc:
        raise SnapshotRejectedError("checksum", "snapshot record checksum does not match its content")
    header_end = _PREFIX.size + header_len
    return view[: _PREFIX.size], view[_PREFIX.size : header_end], view[header_end : header_end + body_len]


def read_header(data: bytes | memoryview) -> dict[str, Any]:
    """Validate framing and checksum of a record and return its header."""
    _, header_view, _ = _split(data)
    return _parse_header(header_view)


def _parse_header(header_view: memoryview) -> dict[str, Any]:
    try:
        return json.loads(bytes(header_view))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SnapshotRejectedError("format", f"snapshot header is not valid JSON: {exc}") from exc


def check_compatible(
    header: dict[str, Any], fingerprint: str | None, engine_config: dict[str, Any] | None
) -> None:
    """Raise :class:`SnapshotRejectedError` unless the header matches this model and engine."""
    if fingerprint is not None and header.get("fingerprint") != fingerprint:
        raise SnapshotRejectedError(
            "fingerprint",
            f"snapshot was made by model {header.get('fingerprint')!r}, this worker runs {fingerprint!r}",
        )
    if engine_config is not None:
        stored = header.get("engine_config", {})
        differing = {
            name: (stored.get(name), value) for name, value in engine_config.items() if stored.get(name) != value
        }
        if differing:
            details = ", ".join(f"{name}: snapshot {old!r}, worker {new!r}" for name, (old, new) in differing.items())
            raise SnapshotRejectedError("engine_config", f"snapshot engine configuration differs ({details})")


def decode_record(
    data: bytes | memoryview,
    fingerprint: str | None = None,
    engine_config: dict[str, Any] | None = None,
) -> SnapshotRecord:
    """Decode and validate one record; ``fingerprint`` and ``engine_config`` must match when given."""
    _, header_view, body = _split(data)
    header = _parse_header(header_view)
    check_compatible(header, fingerprint, engine_config)
    tensors = {}
    offset = 0
    for meta in header["tensors"]:
        stored = bytes(body[offset : offset + meta["stored_len"]])
        offset += meta["stored_len"]
        raw = _decompress(stored, meta["codec"], meta["raw_len"])
        if len(raw) != meta["raw_len"]:
            raise SnapshotRejectedError(
                "truncated", f"tensor {meta['name']} has {len(raw)} bytes, header declares {meta['raw_len']}"
            )
        tensors[meta["name"]] = _tensor_from_bytes(raw, _dtype_from_name(meta["dtype"]), meta["shape"], meta["shuffle"])
    return SnapshotRecord(
        kind=header["kind"],
        fingerprint=header["fingerprint"],
        engine_config=header["engine_config"],
        metadata=header["metadata"],
        keys=tensors["keys"],
        values=tensors["values"],
        slots=header["slots"],
    )


def apply_chain(records: list[SnapshotRecord]) -> SnapshotRecord:
    """Fold a base and its deltas into one base record holding the latest cache."""
    if not records or records[0].kind != "base":
        raise SnapshotRejectedError("chain", "snapshot chain does not start with a base record")
    base = records[0]
    keys = base.keys.clone()
    values = base.values.clone()
    for delta in records[1:]:
        if delta.kind != "delta":
            raise SnapshotRejectedError("chain", "snapshot chain has a second base record")
        if delta.keys.shape[:2] != keys.shape[:2] or delta.keys.shape[3] != keys.shape[3]:
            raise SnapshotRejectedError(
                "chain", f"delta shape {tuple(delta.keys.shape)} does not fit base shape {tuple(keys.shape)}"
            )
        index = torch.tensor(delta.slots, dtype=torch.long)
        if delta.slots and max(delta.slots) >= keys.shape[2]:
            # The engine exports only the used prefix of the slots, so a delta may extend it.
            keys, values = _grow(keys, max(delta.slots) + 1), _grow(values, max(delta.slots) + 1)
        keys[:, :, index, :] = delta.keys
        values[:, :, index, :] = delta.values
    last = records[-1]
    return SnapshotRecord(
        kind="base",
        fingerprint=last.fingerprint,
        engine_config=last.engine_config,
        metadata=last.metadata,
        keys=keys,
        values=values,
    )


def _grow(tensor: torch.Tensor, num_slots: int) -> torch.Tensor:
    grown = tensor.new_zeros((*tensor.shape[:2], num_slots, tensor.shape[3]))
    grown[:, :, : tensor.shape[2]] = tensor
    return grown


def split_chunks(data: bytes, chunk_max_bytes: int) -> list[memoryview]:
    """Split ``data`` into views of at most ``chunk_max_bytes`` (one view for empty data)."""
    view = memoryview(data)
    if not view:
        return [view]
    return [view[start : start + chunk_max_bytes] for start in range(0, len(view), chunk_max_bytes)]
