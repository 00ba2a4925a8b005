"""planner: an analytical resource planner and simulator for training LLMs.

The package is layered; a module imports only from its own layer or the layers below it
(``tests/test_layers.py`` checks every import, lazy ones included):

1. ``planner.errors``, ``planner.units``: the one exception type and SI units with their formatting.
2. ``planner.specs``: what a question is about (model, set-up, GPU, calibration profile, catalogs).
3. ``planner.cost`` (params, FLOPs, activations, memory, step time) and ``planner.loss`` (scaling
   laws, pruning returns, stopping, fitting): pure numpy formulas, siblings that never import each other.
4. ``planner.search``: what fits, candidate plans, Pareto front, convex allocation, plan objects.
5. ``planner.io``: tables, JSON, plots, plan files and exports to training engines.
6. ``planner.truth``: ground truth (fake-tensor traces, real runs, calibration fits); the only
   place torch, transformers and peft are imported, always lazily. Nothing below imports it.
7. ``planner.cli``: the ``planner`` command, one module per verb group.
"""

__version__ = "0.1.0"
