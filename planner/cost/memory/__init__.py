"""Training and serving memory per GPU: owns what each phase of a step holds, for each stack.

``phases`` composes a step (forward, backward, optimizer; the peak is the largest) from ``states``
(weights, gradients, optimizer states and temporaries: no tokens) and ``activation_memory`` (what a
micro-batch keeps: no ZeRO stage or optimizer), whose per-token formulas are ``activations``;
``parallel`` and ``pipeline`` divide them over tensor, sequence, context, expert and pipeline
parallel GPUs; ``saved_modules`` adds peft's trained embedding and head. Other stacks price their own
inventory: ``torchtune_tensors`` / ``torchtune_stack`` and ``torchtitan_tensors`` / ``torchtitan_stack``.
``device`` turns a peak into the bytes a GPU needs (allocator reserve, CUDA context, a calibration
profile) for every verdict; ``inference`` is serving's weights, KV cache and prefill.
May import only ``planner.specs``, ``planner.errors``, numpy and the rest of ``planner.cost``.
"""
