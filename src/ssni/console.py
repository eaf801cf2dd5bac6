"""What ``ssni`` does around every command: the exits a user sees.

- a user error (:class:`ssni.errors.SSNIError`): one ``error:`` line, exit status 2;
- a warning of the package (:class:`ssni.errors.SSNIWarning`): one ``warning:`` line, the run goes on;
- Ctrl-C: one ``interrupted:`` line that says what the run keeps and how to resume it, exit
  status 130 (the shell's for a process ended by SIGINT). A command says what it keeps with
  :func:`on_interrupt` before its long part starts.

Nothing here imports torch, so ``ssni --help`` stays fast.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

from .errors import SSNIError, SSNIWarning

INTERRUPTED = 130  # 128 + SIGINT
_notes: list[Callable[[], str]] = []


def on_interrupt(note: Callable[[], str]) -> None:
    """After Ctrl-C, print ``interrupted: {note()}`` (called then, so it can count what was stored)."""
    _notes[:] = [note]


def one_line(text: object) -> str:
    """``text`` with its line breaks folded into spaces (an error is one line of the terminal)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def run(app: Callable[[], object]) -> None:
    """Run the typer ``app`` with the exits above."""
    shown = warnings.showwarning
    warnings.showwarning = _warning_printer(shown)
    try:
        app()
    except SSNIError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # outside a command (typer turns one inside into exit status 130)
        _say_interrupted()
        raise SystemExit(INTERRUPTED) from None
    except SystemExit as done:
        if done.code == INTERRUPTED:
            _say_interrupted()
        raise
    finally:
        warnings.showwarning = shown
        _notes.clear()


def _say_interrupted() -> None:
    note = _notes[0]() if _notes else "the command stopped before it finished"
    print(f"interrupted: {one_line(note)}", file=sys.stderr)


def _warning_printer(default: Callable) -> Callable:
    """``warning: ...`` on one line for the package's warnings, ``default`` for the others."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, SSNIWarning):
            print(f"warning: {one_line(message)}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


__all__ = ["INTERRUPTED", "on_interrupt", "one_line", "run"]
