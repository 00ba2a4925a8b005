"""The search: from a question with limits to an answer.

Owns what fits on a GPU (``fit``), the plan objects (``plan``: ``PlanRequest``, ``Plan``,
``CompareRequest``) and the search that answers them, in the order it runs: ``context`` (the GPU,
price, law and limits a request resolves to), ``candidates`` (the axes: models and the size
ladder, GPU counts and layouts, data choices, token counts), ``setups`` (memory and step time of
every set-up, into a ``table.SetupTable``), ``scoring`` (loss, time, cost and FLOPs of every
candidate), ``pareto`` (the front and the choice), ``constraints`` (binding limits, stopping,
shortfalls), ``convex`` (the cvxpy geometric program and the check of the grid against it),
``planning`` (``make_plan``) and ``compare`` (allocations side by side); beside them ``finetuning``
(a fine-tuning candidate's loss under a fine-tuning law), ``plausible`` (the evidence's limits in
the constraint table, and what going beyond would gain) and ``lifetime`` (training plus lifetime
inference, ``--inference-tokens``). May import
``planner.cost``, ``planner.loss``, ``planner.specs`` and below; never ``planner.io``,
``planner.truth`` or ``planner.cli``.
"""
