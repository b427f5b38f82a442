"""Shards (write, index, inspect), stateful streams, multi-source batching, synthetic data."""
