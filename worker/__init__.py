"""sinkstream worker: the streaming engine, the Kafka stage loop, state and metrics."""

__version__ = "0.1.0"
