"""The one exception type users see, and the checks every reader of a user's file shares. The CLI
prints a ``PlannerError``'s message on one line and exits with 2."""

from __future__ import annotations

from pathlib import Path


class PlannerError(ValueError):
    """Bad input or an impossible request: the message says what is wrong and what would work."""


def expand_user(path) -> Path:
    """``~`` and ``~name`` expanded; a ``~name`` that names no user stays as typed (pathlib raises)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def user_file(path, what: str) -> Path:
    """``path`` when it names an existing file; else a one-line error that says whether nothing is
    there or a directory is (a directory given for a file is not "no such file")."""
    file = expand_user(path)
    if file.is_dir():
        raise PlannerError(f"{what} {file} is a directory, not a file: give the path of the file itself")
    if not file.is_file():
        raise PlannerError(f"{what} {file}: no such file")
    return file


def read_user_text(path, what: str) -> str:
    """The text of a user's file (UTF-8); a missing file, a directory, an unreadable or a binary
    file is a one-line error naming it."""
    file = user_file(path, what)
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PlannerError(f"{what} {file} is not text (byte {exc.object[exc.start]:#04x} at offset {exc.start} "
                           "is not UTF-8): is it the right file?") from None
    except OSError as exc:
        raise PlannerError(f"cannot read {what} {file}: {exc.strerror or exc}") from None


def writable_file(path, what: str) -> Path:
    """``path`` when a file can be written there: not a directory, in a folder that exists."""
    file = expand_user(path)
    if file.is_dir():
        raise PlannerError(f"{what} {file} is a directory: give a file name inside it")
    if not file.parent.is_dir():
        raise PlannerError(f"cannot write {what} {file}: folder {file.parent} does not exist")
    return file
