"""The Kafka worker: settings, consumer loop, offset tracking and dead letters."""
