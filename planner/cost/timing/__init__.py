"""Step time: owns how long one optimizer step takes, with an interval.

``step_time`` is the roofline of a step (matmul ``efficiency``, memory-bound work, ``communication``
over a cluster, ``host`` overhead, the ``optimizer_step``, ``offload`` copies), ``grounding`` its
constants fitted on published throughput (``published`` maps each published run to a set-up,
``fit`` fits and scores them leaving one source out), and ``intervals`` the answer every verb
prints: step time, tokens/s, MFU and $ per million tokens with their 80% intervals.
May import only ``planner.specs``, ``planner.errors``, numpy and the rest of ``planner.cost``.
"""
