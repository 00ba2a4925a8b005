"""The cost model: what one training step holds and takes, as pure vectorized numpy formulas.

Owns parameter counts, FLOPs, the saved-activation inventory, memory by phase and its peak,
step time (compute, memory traffic, optimizer, communication, host overhead; ``time_model``
grounds it on published throughput, ``time_published``/``time_fit`` map and fit those runs leave
one source out, ``time_estimate`` gives the answer with its interval and cost) and the
application of a calibration profile's corrections. Every function accepts scalars or arrays (micro-batch,
sequence length, LoRA rank) so that a sweep is one call. May import ``planner.specs`` and below;
never torch, never ``planner.loss``, ``planner.search`` or ``planner.truth``.
"""
