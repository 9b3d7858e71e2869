"""``sinkstream snapshots ls|show|rm``: inspect and delete stream snapshots in Redis."""

from __future__ import annotations

import argparse
import sys
import json
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "snapshots",
        help="list, show or delete stream snapshots in Redis",
        description="Inspect the per-stream cache snapshots that workers store in Redis.",
    )
    parser.add_argument(
        "--redis-url", default=None,
        help="Redis URL (default: $SINKSTREAM_REDIS__URL, the worker's setting, else redis://127.0.0.1:6379/0)"
    )
    parser.add_argument(
        "--key-prefix", default=None,
        help="key namespace of the workers (default: $SINKSTREAM_REDIS__KEY_PREFIX, the worker's setting, else sinkstream)"
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = actions.add_parser("ls", help="list streams that have a snapshot, with sizes and offsets")
    ls.add_argument("--limit", type=int, default=0, help="list at most this many streams (default 0: all)")
    ls.set_defaults(func=run_snapshots_command)

    show = actions.add_parser("show", help="print a stream's chains and the header of each record")
    show.add_argument("stream_id", help="stream id, the record key of its events")
    show.set_defaults(func=run_snapshots_command)

    rm = actions.add_parser(
        "rm",
        help="delete a stream's snapshot; its next owner starts it from an empty cache",
        description="Delete every key of the given streams (found with SCAN), damaged heads and unreferenced chunks "
        "included. A worker that owns a stream keeps its cache in memory "
        "and writes a new snapshot at its next checkpoint, so stop the workers of the stream's partition first. "
        "The next owner then starts the stream from an empty cache.",
    )
    rm.add_argument("stream_id", nargs="+", help="stream ids, the record keys of their events")
    rm.set_defaults(func=run_snapshots_command)


def run_snapshots_command(args: argparse.Namespace) -> int:
    import asyncio

    return asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> int:
    from worker.state.config import StateConfig
    from worker.state.store import SnapshotStore

    import os

    overrides: dict[str, Any] = {}
    redis_url = args.redis_url or os.environ.get("SINKSTREAM_REDIS__URL")
    key_prefix = args.key_prefix or os.environ.get("SINKSTREAM_REDIS__KEY_PREFIX")
    if redis_url:
        overrides["redis_url"] = redis_url
    if key_prefix:
        # The worker strips a trailing ':' from redis.key_prefix; match its key names.
        overrides["key_prefix"] = key_prefix.rstrip(":") or "sinkstream"
    try:
        store = SnapshotStore(StateConfig(**overrides))
    except ValueError as exc:
        print(f"error: invalid Redis settings ({redis_url or 'default URL'}): {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "ls":
            return await _list(store, args.limit)
        if args.action == "show":
            return await _show(store, args.stream_id)
        return await _remove(store, args.stream_id)
    finally:
        await store.close()


def printable(text: str) -> str:
    """Return ``text`` as it is when every character is printable, else as ``ascii(text)``.

    Stream ids and topics come from Redis keys and values, which anyone with access can
    write, so control characters (terminal escapes, line breaks) must not reach the terminal.
    """
    return text if text.isprintable() else ascii(text)


async def _list(store: Any, limit: int) -> int:
    """Print one line per stream, and one per damaged head key with the reason; exit 2 if any is damaged."""
    print(f"{'stream':<40} {'records':>7} {'bytes':>12} {'topic[partition]':<24} {'last offset':>11} committed")
    count = 0
    damaged = 0
    async for entry in store.list_heads():
        if entry.problem is not None:
            if entry.stream_id is not None:
                print(f"{printable(entry.stream_id):<40} DAMAGED: {printable(entry.problem)}")
            else:
                # 'snapshots rm' takes stream ids, and none maps to this key.
                print(f"key {ascii(entry.key)} DAMAGED: {printable(entry.problem)}; delete it with redis-cli UNLINK")
            damaged += 1
            continue
        head = entry.head
        chain = head.latest or head.committed
        if chain is None:
            continue
        where = f"{printable(chain.topic)}[{chain.partition}]" if chain.topic is not None else "-"
        committed = "yes" if head.committed == head.latest else "no"
        print(
            f"{printable(entry.stream_id):<40} {len(chain.records):>7} {chain.num_bytes:>12} {where:<24} "
            f"{chain.last_offset!s:>11} {committed}"
        )
        count += 1
        if limit and count >= limit:
            break
    if damaged:
        print(f"{count} streams, {damaged} damaged head keys "
              "('sinkstream snapshots rm STREAM_ID' deletes the keys of a stream)")
    else:
        print(f"{count} streams")
    return 2 if damaged else 0


async def _show(store: Any, stream_id: str) -> int:
    from worker.state.exceptions import DamagedHeadError, SnapshotRejectedError
    from worker.state.format import read_header

    try:
        head = await store.read_head(stream_id)
    except DamagedHeadError as exc:
        print(f"stream {stream_id!r}: DAMAGED head key {exc.key!r}: {printable(exc.problem)}")
        print(f"  'sinkstream snapshots rm {printable(stream_id)}' deletes it and the stream's chunks")
        return 2
    if head.latest is None and head.committed is None:
        print(f"no snapshot of stream {stream_id!r} under prefix {store.prefix!r}")
        return 1
    status = 0
    for name, chain in (("latest", head.latest), ("committed", head.committed)):
        if chain is None:
            print(f"{name}: none")
            continue
        topic = printable(chain.topic) if chain.topic is not None else None
        print(f"{name}: {len(chain.records)} records, {chain.num_bytes} bytes, {topic}[{chain.partition}] "
              f"through offset {chain.last_offset}, {chain.tokens_written} tokens written")
        if name == "committed" and chain == head.latest:
            print("  (same chain as latest)")
            continue
        for ref in chain.records:
            try:
                header = read_header(await store.read_record(stream_id, ref))
            except SnapshotRejectedError as exc:
                print(f"  {ref.kind} {ref.record_id}: {ref.num_bytes} bytes, REJECTED ({exc.reason}): {exc}")
                status = 2
                continue
            metadata = {key: value for key, value in header["metadata"].items() if key not in ("layout", "extra")}
            kind, fingerprint = printable(str(header["kind"])), printable(str(header["fingerprint"]))
            print(f"  {kind} {ref.record_id}: {ref.num_bytes} bytes in {ref.num_chunks} chunks, checksum ok")
            print(f"    model {fingerprint}, engine {json.dumps(header['engine_config'], sort_keys=True)}")
            print(f"    metadata {json.dumps(metadata, sort_keys=True)}")
            for tensor in header["tensors"]:
                name_dtype_codec = [printable(str(tensor[key])) for key in ("name", "dtype", "codec")]
                print(f"    {name_dtype_codec[0]}: {name_dtype_codec[1]} {tensor['shape']}, {name_dtype_codec[2]}, "
                      f"{tensor['raw_len']} -> {tensor['stored_len']} bytes")
    return status


async def _remove(store: Any, stream_ids: list[str]) -> int:
    status = 0
    for stream_id in stream_ids:
        deleted = await store.delete_stream(stream_id, every_key=True)
        if deleted:
            print(f"deleted the snapshot of stream {stream_id!r} ({deleted} keys)")
        else:
            print(f"no snapshot of stream {stream_id!r}")
            status = 1
    return status
