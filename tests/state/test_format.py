import struct

import pytest
import torch

from tests.state.conftest import ENGINE_CONFIG, FINGERPRINT, cache_state
from worker.state.exceptions import SnapshotRejectedError
from worker.state.format import (
    FORMAT_VERSION,
    SnapshotRecord,
    apply_chain,
    decode_record,
    encode_record,
    read_header,
    split_chunks,
)


def base_record(dtype=torch.bfloat16, seed=0) -> SnapshotRecord:
    state = cache_state(tokens_written=20, seed=seed, dtype=dtype)
    return SnapshotRecord("base", FINGERPRINT, state.engine_config, state.metadata, state.keys, state.values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_record_round_trip_is_bit_exact(dtype, compression):
    record = base_record(dtype)
    data, stats = encode_record(record, compression=compression)
    decoded = decode_record(data, FINGERPRINT, ENGINE_CONFIG)
    assert decoded.keys.dtype == dtype
    assert torch.equal(decoded.keys.view(torch.uint8), record.keys.view(torch.uint8))
    assert torch.equal(decoded.values.view(torch.uint8), record.values.view(torch.uint8))
    assert decoded.metadata == record.metadata
    assert stats.raw_bytes == 2 * record.keys.numel() * record.keys.element_size()


def test_record_compression_skipped_when_it_does_not_pay():
    # Random bytes cannot be compressed, so the codec must fall back to none.
    noise = torch.randint(0, 256, (2, 2, 32, 8), dtype=torch.uint8)
    record = SnapshotRecord("base", FINGERPRINT, ENGINE_CONFIG, {}, noise, noise.clone())
    _, stats = encode_record(record, compression="zstd", min_gain=0.05)
    assert stats.codecs == {"keys": "none", "values": "none"}


def test_record_zeros_compress():
    zeros = torch.zeros((2, 2, 64, 8), dtype=torch.bfloat16)
    record = SnapshotRecord("base", FINGERPRINT, ENGINE_CONFIG, {}, zeros, zeros.clone())
    _, stats = encode_record(record, compression="zstd")
    assert stats.codecs["keys"] == "zstd"
    assert stats.stored_bytes < stats.raw_bytes / 10


def test_record_flipped_byte_rejected_as_checksum():
    data = bytearray(encode_record(base_record())[0])
    for position in (len(data) // 2, len(data) - 10, 30):
        corrupted = bytearray(data)
        corrupted[position] ^= 0x01
        with pytest.raises(SnapshotRejectedError) as info:
            decode_record(bytes(corrupted))
        assert info.value.reason == "checksum", position


def test_record_truncated_rejected():
    data = encode_record(base_record())[0]
    for length in (2, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(SnapshotRejectedError) as info:
            decode_record(data[:length])
        assert info.value.reason in ("truncated", "format"), length
    with pytest.raises(SnapshotRejectedError) as info:
        decode_record(data[: len(data) - 1])
    assert info.value.reason == "truncated"


def test_record_other_version_rejected_as_format():
    data = bytearray(encode_record(base_record())[0])
    struct.pack_into("<H", data, 4, FORMAT_VERSION + 1)
    with pytest.raises(SnapshotRejectedError) as info:
        decode_record(bytes(data))
    assert info.value.reason == "format"


def test_record_not_a_snapshot_rejected_as_format():
    with pytest.raises(SnapshotRejectedError) as info:
        decode_record(b"hello world, not a snapshot")
    assert info.value.reason == "format"


def test_record_wrong_model_rejected_as_fingerprint():
    data = encode_record(base_record())[0]
    with pytest.raises(SnapshotRejectedError) as info:
        decode_record(data, "another-model", ENGINE_CONFIG)
    assert info.value.reason == "fingerprint"


@pytest.mark.parametrize(
    "change", [{"window_tokens": 60}, {"sink_tokens": 2}, {"dtype": "float32"}, {"capacity": 64}]
)
def test_record_other_engine_config_rejected(change):
    data = encode_record(base_record())[0]
    with pytest.raises(SnapshotRejectedError) as info:
        decode_record(data, FINGERPRINT, dict(ENGINE_CONFIG, **change))
    assert info.value.reason == "engine_config"
    assert next(iter(change)) in str(info.value)


def test_read_header_returns_metadata_without_tensors():
    record = base_record()
    header = read_header(encode_record(record)[0])
    assert header["kind"] == "base"
    assert header["metadata"] == record.metadata
    assert [meta["shape"] for meta in header["tensors"]] == [list(record.keys.shape)] * 2


def test_apply_chain_overwrites_delta_slots():
    base = base_record(seed=1)
    newer = base_record(seed=2)
    slots = [5, 0, 31]
    delta = SnapshotRecord(
        "delta",
        FINGERPRINT,
        ENGINE_CONFIG,
        {"tokens_written": 99},
        newer.keys[:, :, slots],
        newer.values[:, :, slots],
        slots=slots,
    )
    folded = apply_chain([base, delta])
    assert torch.equal(folded.keys[:, :, slots], newer.keys[:, :, slots])
    untouched = [slot for slot in range(base.keys.shape[2]) if slot not in slots]
    assert torch.equal(folded.keys[:, :, untouched], base.keys[:, :, untouched])
    assert torch.equal(folded.values[:, :, slots], newer.values[:, :, slots])
    assert folded.metadata == {"tokens_written": 99}
    assert torch.equal(base.keys, base_record(seed=1).keys), "apply_chain must not modify the base"


def test_apply_chain_without_base_rejected():
    record = base_record()
    delta = SnapshotRecord("delta", FINGERPRINT, ENGINE_CONFIG, {}, record.keys[:, :, :1], record.values[:, :, :1], [0])
    with pytest.raises(SnapshotRejectedError) as info:
        apply_chain([delta])
    assert info.value.reason == "chain"


def test_split_chunks_rejoins_exactly():
    data = bytes(range(256)) * 41
    chunks = split_chunks(data, 1000)
    assert all(len(chunk) <= 1000 for chunk in chunks)
    assert len(chunks) == 11
    assert b"".join(chunks) == data
    assert [bytes(chunk) for chunk in split_chunks(b"", 1000)] == [b""]
