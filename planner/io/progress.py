"""Progress bars on stderr for anything that runs longer than a couple of seconds.

Owns the one way the planner shows progress: ``progress_bar(total, desc, enabled)`` returns a
``tqdm`` bar writing to stderr when ``enabled`` and stderr is a terminal, and otherwise
``NULL_BAR``, a no-op with the same methods, so that library code advances a bar without asking
whether anyone watches; ``print_line`` prints a message line to stderr without breaking a bar
that is drawn. Library functions take ``show_progress: bool = False`` and the CLI passes
``show_progress=not args.json``: a bar never appears under ``--json``, in a pipe, in a log file or
in a notebook (whose stderr is no terminal), and a finished bar is erased (``leave=False``), so
what stays on the screen is what the command printed. tqdm is imported only when a bar is drawn.

Usage::

    from planner.io.progress import progress_bar

    with progress_bar(len(points), "calibrate", enabled=show_progress, unit="point") as bar:
        for point in points:
            ...
            bar.update()            # one step done; bar.set_postfix_str(point.label) to say which
"""

from __future__ import annotations

import sys
from typing import Any


class NullBar:
    """A progress bar that draws nothing: the methods of a ``tqdm`` bar that the planner uses."""

    n = 0
    total: float | None = None

    def update(self, n: float = 1) -> None:
        """Advance by ``n`` (ignored)."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Text after the bar (ignored)."""

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        """Text before the bar (ignored)."""

    def close(self) -> None:
        """Nothing to erase."""

    def __enter__(self) -> NullBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


NULL_BAR = NullBar()
"""The shared no-op bar: a default for functions that take a bar to advance."""


def progress_bar(total: float | None, desc: str, enabled: bool = True, *, unit: str = "it"):
    """A bar counting ``total`` steps of ``unit`` labelled ``desc``, on stderr, or ``NULL_BAR``.

    Drawn only when ``enabled`` (the caller's: not under ``--json``) and ``sys.stderr`` is a
    terminal. Use it as a context manager (the bar is erased on exit) and call ``update(n=1)``
    after each step; ``total=None`` shows a count and a rate without a percentage.
    """
    if not enabled or not _is_terminal(sys.stderr):
        return NULL_BAR
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True)


def print_line(text: str) -> None:
    """Print ``text`` and a newline to stderr; a bar that is drawn is cleared first and redrawn
    below the line (``tqdm.write``), so messages and bars can alternate."""
    if "tqdm" not in sys.modules:  # no bar was ever drawn: a plain line
        print(text, file=sys.stderr, flush=True)
        return
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)
    sys.stderr.flush()


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False
