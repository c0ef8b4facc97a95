"""Scheduling, KV cache, sampling and the generate loop."""
