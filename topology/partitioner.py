"""Kafka's default key partitioner: murmur2 of the key bytes, made non-negative, modulo partitions.

This is the mapping of the Java client's ``DefaultPartitioner`` / ``BuiltInPartitioner``
for records with a key, of aiokafka's ``DefaultPartitioner``, and of librdkafka's
``murmur2_random`` partitioner (``partitioner=murmur2_random`` in confluent-kafka,
``-X topic.partitioner=murmur2_random`` in kcat). librdkafka's own default,
``consistent_random``, hashes with CRC32 instead and puts keys on other partitions.

The hash is aiokafka's pure-Python port of ``org.apache.kafka.common.utils.Utils.murmur2``;
the tests check it against the Java client's own test vectors.
"""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as _murmur2_unsigned

__all__ = ["DefaultPartitioner", "murmur2", "partition_for_key", "partition_for_stream"]


def murmur2(data: bytes) -> int:
    """Return the Java client's ``Utils.murmur2(data)``: a signed 32-bit int."""
    hashed = _murmur2_unsigned(data)
    return hashed - (1 << 32) if hashed & 0x80000000 else hashed


def partition_for_key(key: bytes, num_partitions: int) -> int:
    """Return the partition Kafka's default partitioner gives ``key`` among ``num_partitions``."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


def partition_for_stream(stream_id: str, num_partitions: int) -> int:
    """Return the partition of a stream's events: its id, UTF-8 encoded, is the record key."""
    return partition_for_key(stream_id.encode("utf-8"), num_partitions)
