"""`planner <verb>`: the parser and the entry point.

Each group of verbs lives in its own module with a ``register(subparsers)`` function; handlers
import what they need lazily so that `planner estimate` answers well under a second.
Any ``PlannerError`` (or pydantic validation error) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import sys

from planner.errors import PlannerError

VERB_MODULES = ("planner.cli.train", "planner.cli.loss", "planner.cli.truth", "planner.cli.plan", "planner.cli.serve")


NEGATIVE_NUMBER = re.compile(r"^-(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?[A-Za-z]?|inf(?:inity)?|nan)$", re.IGNORECASE)
r"""What argparse should take as a (negative) value, not an option: -5, -1e21, -0.5, -70B, -inf.
argparse's own pattern (``^-\d+$|^-\d*\.\d+$``) misses exponents and suffixes, so
``--compute -1e21`` said "expected one argument" instead of "--compute must be positive"."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus a message; users get one line, exit code 2. A negative number
    is read as a value (and then rejected by the option's type with its own message)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"planner: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


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
        return _fail(str(exc))
    except BrokenPipeError:  # the reader went away (`planner fit ... | head`): nothing to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # The readers and writers check their paths first (``planner.errors.user_file``); what is
        # left is the machine's answer (permissions, a full disk): one line naming the file.
        where = f" {exc.filename}" if exc.filename else ""
        return _fail(f"cannot access{where}: {exc.strerror or exc} (check the path and its permissions)")
    except Exception as exc:
        # pydantic's ValidationError is a ValueError; its message spans lines: keep the first error.
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            return _fail(validation_message(exc))
        raise


def validation_message(exc) -> str:
    """The first error of a pydantic ValidationError on one line: where, then what."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    what = first["msg"].removeprefix("Value error, ")
    return f"{where}: {what}" if where else what


def _fail(message: str) -> int:
    print(f"planner: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
