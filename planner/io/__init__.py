"""Output and files: what people and other tools read.

Owns text tables and JSON (``report``), matplotlib figures (``plots``), plan files in JSON or
YAML (``planfiles``), launch configurations in each engine's own format (``exports``) and
progress bars on stderr for long runs (``progress``). May import ``planner.search``,
``planner.cost``, ``planner.loss``, ``planner.specs`` and below.
"""
