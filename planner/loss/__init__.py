"""The loss side: what a run of a given size on given data will reach, and when to stop.

Owns the scaling laws (``scaling``: the law files and formulas with data-constrained repetition,
compute-optimal allocation, fitting a law to runs), the returns of data selection and pruning
(``pruning``), the stopping rule on a loss curve (``stopping``: curve families, the rule, log
reading, backtests), the domain of evidence of every model and the plausibility limits a plan keeps
by default (``evidence``), and what they share (``fitting``: the robust fitting machinery;
``csv_files``: reading the user's CSV files). May import ``planner.specs`` and below; never
``planner.cost``, ``planner.search`` or ``planner.truth``. Importing it loads neither cvxpy,
scipy nor pandas: each is imported inside the function that uses it.
"""
