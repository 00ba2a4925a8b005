"""Serving: owns ``capacity`` (weights and the KV cache as vLLM's paged blocks allocate it, the largest
batch and context) and ``throughput`` (prefill and decode rooflines with achieved rates fitted on
published serving measurements: latency, tokens per second, $ per million tokens).
May import only ``planner.specs``, ``planner.errors``, numpy and the rest of ``planner.cost``.
"""
