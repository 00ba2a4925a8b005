"""The cost model: what one training step (or one served token) holds and takes, as pure
vectorized numpy formulas.

Owns, at this level: ``params`` (parameter counts), ``flops`` (forward, backward and recompute FLOPs),
``spec_facts`` (per-spec caches the search shares), ``support`` (which set-ups each model prices,
and a one-line refusal for the rest), ``estimate`` (the ``planner estimate`` answer) and
``calibrated`` (a calibration profile's corrections). Below it: ``memory/`` (bytes per GPU by phase,
per stack and parallel layout, and the device bytes of a verdict), ``timing/`` (step time grounded on
published throughput, with intervals) and ``serving/`` (KV capacity, prefill and decode).
Every function accepts scalars or arrays (micro-batch, sequence length, LoRA rank) so that a sweep
is one call. May import ``planner.specs`` and below; never torch, never ``planner.loss``,
``planner.search`` or ``planner.truth``.
"""
