"""Redis key names of stream snapshots.

Every key of one stream carries the stream id as a Redis Cluster hash tag, so a
stream's pointer and its record chunks live in one hash slot and one MULTI/EXEC can
touch them all::

    <prefix>:snap:{<stream tag>}:head                 hash: "latest" and "committed" chains
    <prefix>:snap:{<stream tag>}:r:<record id>:<n>    chunk n of one record

One more key per partition, with the topic and partition as its hash tag, records that
checkpoints of the partition are stored here (see :mod:`worker.state.hooks`)::

    <prefix>:part:{<topic>/<partition>}:marker        hash: "covered_from" offset

The stream tag is the stream id with ``%``, ``{`` and ``}`` percent-encoded, because
Redis takes the hash tag up to the first ``}``.
"""

from __future__ import annotations

import re

_ESCAPES = {"%": "%25", "{": "%7B", "}": "%7D"}
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


def stream_tag(stream_id: str) -> str:
    return "".join(_ESCAPES.get(char, char) for char in stream_id)


def stream_id_from_tag(tag: str) -> str:
    return tag.replace("%7B", "{").replace("%7D", "}").replace("%25", "%")


def head_key(prefix: str, stream_id: str) -> str:
    return f"{prefix}:snap:{{{stream_tag(stream_id)}}}:head"


def chunk_key(prefix: str, stream_id: str, record_id: str, index: int) -> str:
    return f"{prefix}:snap:{{{stream_tag(stream_id)}}}:r:{record_id}:{index}"


def partition_marker_key(prefix: str, topic: str, partition: int) -> str:
    return f"{prefix}:part:{{{stream_tag(topic)}/{partition}}}:marker"


def head_pattern(prefix: str) -> str:
    """Return the SCAN MATCH pattern of every head key under ``prefix``."""
    escaped_prefix = _GLOB_SPECIAL.sub(r"\\\1", prefix)
    return f"{escaped_prefix}:snap:{{*}}:head"


def stream_pattern(prefix: str, stream_id: str) -> str:
    """Return the SCAN MATCH pattern of every key of one stream: its head and its chunks."""
    escaped_prefix = _GLOB_SPECIAL.sub(r"\\\1", prefix)
    escaped_tag = _GLOB_SPECIAL.sub(r"\\\1", stream_tag(stream_id))
    return f"{escaped_prefix}:snap:{{{escaped_tag}}}:*"


def stream_id_from_head_key(prefix: str, key: str) -> str | None:
    """Return the stream id of a head key, or None when ``key`` is not one under ``prefix``."""
    start = f"{prefix}:snap:{{"
    end = "}:head"
    if not (key.startswith(start) and key.endswith(end)):
        return None
    return stream_id_from_tag(key[len(start) : -len(end)])
