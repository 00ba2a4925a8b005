"""`planner <verb>`: the parser and the entry point.

Each group of verbs lives in its own module with a ``register(subparsers)`` function; handlers
import what they need lazily so that `planner estimate` answers well under a second.
Any ``PlannerError`` (or pydantic validation error) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from planner.errors import PlannerError

VERB_MODULES = ("planner.cli.train", "planner.cli.loss", "planner.cli.truth", "planner.cli.plan")


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus a message; users get one line, exit code 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"planner: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _OneLineParser(prog="planner", description="`planner <verb>`: parse, load specs, call the library, report.")
    subparsers = parser.add_subparsers(dest="verb", required=True, parser_class=_OneLineParser)
    for name in VERB_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except PlannerError as exc:
        print(f"planner: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # pydantic's ValidationError is a ValueError; its message spans lines: keep the first error.
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "input"
            print(f"planner: error: {where}: {first['msg']}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
