"""Running the CLI in-process for the fuzz tests: the exit code and both streams of ``planner ARGV``."""

from __future__ import annotations

import contextlib
import io

from planner.cli import main


def run(*argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``planner ARGV`` in-process; argparse's exits included.
    Any other exception propagates: a traceback fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, nothing on stdout, one line on stderr naming the problem; returns that line."""
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, (code, out[:300], err)
    assert out == "", out[:300]
    assert len(lines) == 1 and lines[0].startswith("planner: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def assert_answer_or_error(result) -> None:
    """Either an answer (exit 0, something on stdout) or a one-line error."""
    code, out, err = result
    if code == 0:
        assert out.strip(), err
    else:
        assert_one_line_error(result)
