"""The search: from a question with limits to an answer.

Owns what fits on a GPU (``fit``), the candidate plans and their vectorized evaluation, the
constraints, the Pareto front, the convex (cvxpy) allocation and the plan objects (``plan``:
``PlanRequest``, ``Plan``, ``CompareRequest``). May import ``planner.cost``, ``planner.loss``,
``planner.specs`` and below; never ``planner.io``, ``planner.truth`` or ``planner.cli``.
"""
