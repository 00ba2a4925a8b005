"""The cost model: what one training step holds and takes, as pure vectorized numpy formulas.

Owns parameter counts, FLOPs, the saved-activation inventory, memory by phase and its peak,
step time (compute, memory traffic, optimizer, communication, host overhead) and the application
of a calibration profile's corrections. Every function accepts scalars or arrays (micro-batch,
sequence length, LoRA rank) so that a sweep is one call. May import ``planner.specs`` and below;
never torch, never ``planner.loss``, ``planner.search`` or ``planner.truth``.
"""
