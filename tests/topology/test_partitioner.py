"""The murmur2 partitioner against the Java client's vectors and librdkafka on a real broker."""

from __future__ import annotations

import pytest

from topology.partitioner import murmur2, partition_for_key, partition_for_stream

# org.apache.kafka.common.utils.UtilsTest#testMurmur2 in the Apache Kafka clients tests.
JAVA_MURMUR2_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}

STREAM_IDS = [f"stream-{index}" for index in range(40)] + ["", "ü", "日本語のストリーム", "a" * 255]


@pytest.mark.parametrize("key", list(JAVA_MURMUR2_VECTORS), ids=lambda key: key.decode())
def test_murmur2_java_vector_matches(key):
    assert murmur2(key) == JAVA_MURMUR2_VECTORS[key]


def test_partition_for_key_masks_sign_bit():
    # -973932308 & 0x7fffffff == 1173551340; 1173551340 % 7 == 3
    assert partition_for_key(b"21", 7) == 1173551340 % 7 == 3


def test_partition_for_key_one_partition_is_zero():
    assert all(partition_for_stream(stream_id, 1) == 0 for stream_id in STREAM_IDS)


def test_partition_for_key_zero_partitions_rejected():
    with pytest.raises(ValueError, match="num_partitions"):
        partition_for_key(b"k", 0)


def test_partition_for_key_spreads_streams():
    partitions = {partition_for_stream(f"stream-{index}", 8) for index in range(200)}
    assert partitions == set(range(8))


def test_partitioner_matches_librdkafka_murmur2_random(broker, new_topics):
    """confluent-kafka with partitioner=murmur2_random puts every key where partition_for_key says."""
    from confluent_kafka import Producer

    (topic,) = new_topics("keys", partitions=7)
    delivered: dict[bytes, int] = {}

    def on_delivery(error, message):
        assert error is None, error
        delivered[message.key()] = message.partition()

    producer = Producer(
        {"bootstrap.servers": broker.bootstrap_servers, "partitioner": "murmur2_random", "enable.idempotence": False}
    )
    keys = [stream_id.encode() for stream_id in STREAM_IDS if stream_id]
    for key in keys:
        producer.produce(topic, value=b"x", key=key, on_delivery=on_delivery)
    assert producer.flush(30) == 0

    assert len(delivered) == len(keys)
    mismatched = {key: partition for key, partition in delivered.items() if partition != partition_for_key(key, 7)}
    assert mismatched == {}
