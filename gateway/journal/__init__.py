"""The hash-chained, per-session journal in Redis Streams."""
