"""Ground truth: what PyTorch itself says, and what real runs measure.

Owns the fake-tensor oracle (``trace``: the stack's real model code under ``MemTracker`` and
``FlopCounterMode``, no GPU, no weights), ``simulate`` (that account beside the estimate), short
real runs on this machine's device (``profile``), fitting a calibration profile from measurements
(``calibrate``) and reading runs the user already profiled (``ingest``). The only layer that
imports torch, transformers, peft or bitsandbytes, always inside functions. May import
``planner.io``, ``planner.cost``, ``planner.specs`` and below; nothing outside ``planner.cli``
imports it.
"""
