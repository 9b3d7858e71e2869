"""Per-stream cache snapshots in Redis and the checkpoint protocol that ties them to offsets."""
