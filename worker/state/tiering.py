"""The Redis tier of stream residency: idle streams beyond the host tier live only in Redis.

The engine keeps ``max_resident_streams`` streams in device slots and moves idle ones to
host memory, up to ``max_host_streams``. Beyond that, this module drops idle streams
from the engine altogether, least recently used first, and their snapshot in Redis is
the only copy; the stage restores such a stream before its next event.

Only clean streams are dropped: streams with no event applied since their last
successful checkpoint, so the latest chain in Redis equals the cache in the engine and
dropping writes nothing. Streams that changed since then wait for the next checkpoint.
Streams that hold no cache at all (only reset, or one pending token) are dropped once
clean, and idle resident streams are dropped too while other streams wait for room,
so that small slot and host settings cannot leave a stream waiting for ever.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any


def plan_redis_offload(
    host_lru: Sequence[str],
    changed: Collection[str],
    busy: Collection[str],
    max_host_streams: int,
    low_watermark: float = 0.75,
) -> list[str]:
    """Return host-tier streams to drop from the engine, least recently used first.

    ``host_lru`` lists the host tier from least to most recently used. Streams are picked
    until at most ``low_watermark * max_host_streams`` remain, skipping streams that
    changed since their last checkpoint (``changed``) or have work queued (``busy``).
    """
    if not 0.0 <= low_watermark <= 1.0:
        raise ValueError(f"low_watermark={low_watermark} is invalid; use a fraction between 0 and 1")
    target = int(max_host_streams * low_watermark)
    excess = len(host_lru) - target
    if excess <= 0:
        return []
    chosen = []
    for stream_id in host_lru:
        if len(chosen) >= excess:
            break
        if stream_id in changed or stream_id in busy:
            continue
        chosen.append(stream_id)
    return chosen


def offload_clean_streams(
    engine: Any, changed: Collection[str], max_host_streams: int, low_watermark: float = 0.75,
    waiting: int = 0,
) -> list[str]:
    """Drop clean idle streams from ``engine``; returns their ids.

    Dropped are: host-tier streams down to ``low_watermark``; streams the engine tracks
    that hold neither a slot nor a host copy (a stream that was only reset, or whose
    only token is still pending); and, while ``waiting`` streams wait for room, as many
    clean idle resident streams, least recently used first. Must run on the thread that
    owns the engine. The caller must restore each returned stream from Redis before it
    submits the stream's next event.
    """
    host = engine.host_stream_ids()
    busy = {stream_id for stream_id in host if not engine.is_idle(stream_id)}
    chosen = plan_redis_offload(host, changed, busy, max_host_streams, low_watermark)
    resident = engine.resident_stream_ids()
    placed = set(host) | set(resident)
    for stream_id in engine.known_streams():
        if stream_id not in placed and stream_id not in changed and engine.is_idle(stream_id):
            chosen.append(stream_id)
    needed = waiting - len(chosen)
    for stream_id in resident:
        if needed <= 0:
            break
        if stream_id not in changed and engine.is_idle(stream_id):
            chosen.append(stream_id)
            needed -= 1
    for stream_id in chosen:
        engine.drop_stream(stream_id)
    return chosen
