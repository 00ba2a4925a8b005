"""Ground truth: what PyTorch itself says, and what real runs measure.

Owns the fake-tensor oracle: ``trace`` (its entry points: the stack's real model code under
``MemTracker`` and ``FlopCounterMode``, no GPU, no weights) built from ``training_model`` (the
model of a set-up), ``fake_tensors`` (running it on fake tensors), ``optimizers``,
``phase_tracker`` (peaks per phase) and ``flop_attribution`` (FLOPs per component); ``simulate``
(that account beside the estimate); short real runs on this machine's device (``profile``, over
the points of ``calibration_grid``, with ``real_step`` and ``device_facts``); fitting a
calibration profile from measurements (``calibrate``) and reading runs the user already profiled
(``ingest``). The only layer that imports torch, transformers, peft or bitsandbytes, always
inside functions. May import ``planner.io``, ``planner.cost``, ``planner.specs`` and below;
nothing outside ``planner.cli`` imports it.
"""
