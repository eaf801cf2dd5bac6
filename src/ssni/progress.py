"""Progress bars on a terminal, plain lines in a redirected log.

``tqdm(...)`` takes the calls the package makes of :class:`tqdm.tqdm` (an iterable or ``total``,
``initial``, ``desc``, ``unit``, ``unit_scale``, ``leave``, ``disable``; ``update``,
``set_postfix``, ``close``, ``write``). On a terminal it is tqdm itself. When the stream is not a
terminal (``> run.log``, a pipe, a batch job) tqdm's redraws would leave carriage returns and
cursor-up codes (``ESC[A``) in the file, so it is a :class:`PlainProgress` instead: one plain
line at every tenth of the total, at most one a minute in between, and one at the end; nested
bars that vanish when done (``leave=False``) print nothing.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm as _tqdm

INTERVAL = 60.0  # most seconds between two lines of one bar (besides its tenths)


def tqdm(iterable=None, *, total=None, initial=0, desc=None, unit="it", unit_scale=False, leave=True,
         disable=False, file=None, **kwargs):
    """tqdm on a terminal, else :class:`PlainProgress` (same calls)."""
    stream = file if file is not None else sys.stderr
    if disable or _is_terminal(stream):
        return _tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                     leave=leave, disable=disable, file=file, **kwargs)
    return PlainProgress(iterable, total, initial, desc or "", unit, unit_scale, not leave, stream)


tqdm.write = _tqdm.write


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """A progress report of plain lines: ``desc: 40/200 img (20%), 12 s, ETA 48 s, loss=0.12``."""

    def __init__(self, iterable, total, initial: int, desc: str, unit: str, unit_scale: bool, quiet: bool,
                 stream):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        self.unit_scale, self.quiet, self.stream, self.postfix = unit_scale, quiet, stream, ""
        self.start = self.last_time = time.monotonic()
        self.initial, self.last_n, self.closed = initial, initial, False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, count: int = 1) -> None:
        before, self.n = self.n, self.n + count
        now = time.monotonic()
        tenth = bool(self.total) and int(10 * before / self.total) != int(10 * self.n / self.total)
        if tenth or now - self.last_time >= INTERVAL:
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and self.n != self.last_n:
            self._line(time.monotonic())
        self.closed = True

    def _count(self, n: float) -> str:
        return _tqdm.format_sizeof(n) if self.unit_scale else str(n)

    def _line(self, now: float) -> None:
        self.last_time, self.last_n = now, self.n
        if self.quiet:
            return
        elapsed = now - self.start
        text = f"{self.desc}: {self._count(self.n)}"
        if self.total:
            text += f"/{self._count(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {self.unit}"
        text += f", {_tqdm.format_interval(elapsed)}"
        done = self.n - self.initial  # this run's part: a resumed run's rate leaves out what was done before
        if self.total and 0 < done and self.n < self.total:
            text += f", ETA {_tqdm.format_interval(elapsed * (self.total - self.n) / done)}"
        print(text + (f", {self.postfix}" if self.postfix else ""), file=self.stream, flush=True)


__all__ = ["PlainProgress", "tqdm"]
