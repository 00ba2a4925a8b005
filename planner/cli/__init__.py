"""The ``planner`` command. Owns the verbs: one module per group of verbs, each parsing its flags, loading
specs, calling the library and printing through ``planner.io``. Handlers import what they use
inside themselves, so a verb pays only for its own imports (``planner --help`` loads no numpy).
May import every layer.
"""

from planner.cli.app import main

__all__ = ["main"]
