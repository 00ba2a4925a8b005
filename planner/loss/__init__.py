"""The loss side: what a run of a given size on given data will reach, and when to stop.

Owns the scaling laws (fit files in ``models_catalog/scaling_laws``, data-constrained repetition,
compute-optimal allocation), the returns of data selection and pruning, the stopping rule on a
loss curve, and the robust fitting machinery they share. May import ``planner.specs`` and below;
never ``planner.cost``, ``planner.search`` or ``planner.truth``.
"""
