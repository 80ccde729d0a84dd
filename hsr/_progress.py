"""A tiny progress printer for long work (index builds, model conversion), on stderr.

No tqdm: one line, rewritten in place on a terminal, at most about two updates a second.
It prints only when stderr is a terminal or ``HSR_PROGRESS=1``; ``HSR_PROGRESS=0`` silences
it on a terminal too. When stderr is not a terminal (a log file, a CI job), each update is a
line of its own, so the throttle keeps logs short.

    with Progress("hsr: coding keys", total=n, unit="keys") as p:
        for s in range(0, n, chunk):
            ...
            p.update(min(chunk, n - s))
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

__all__ = ["Progress", "progress_enabled"]

MIN_INTERVAL = 0.5  # seconds between two printed updates (~2 a second)


def progress_enabled(stream: TextIO | None = None) -> bool:
    """True when progress should print: ``HSR_PROGRESS=1``, or stderr is a terminal and
    ``HSR_PROGRESS`` is not ``0``."""
    flag = os.environ.get("HSR_PROGRESS", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _fmt_count(x: float) -> str:
    if x >= 10_000_000:
        return f"{x / 1e6:.0f}M"
    if x >= 10_000:
        return f"{x / 1e3:.0f}K"
    return f"{x:g}"


class Progress:
    """Count ``done`` of ``total`` units, printed to stderr at most every ``MIN_INTERVAL``.

    Parameters
    ----------
    desc : str
        What is being done; starts the line.
    total : int, optional
        Units of work; without it only the count and the time are printed.
    unit : str, default ""
        Name of a unit ("keys", "steps").
    stream : file, optional
        Where to print (default ``sys.stderr``, looked up when the printer is made).
    enabled : bool, optional
        Force on or off; default :func:`progress_enabled`.

    The first update prints at once; later ones when ``MIN_INTERVAL`` has passed since the
    last line printed; :meth:`close` (or leaving the ``with`` block) prints the final count
    and the elapsed time, if anything was printed before or the work took longer than the
    interval.
    """

    def __init__(self, desc: str, total: int | None = None, *, unit: str = "", stream: TextIO | None = None,
                 enabled: bool | None = None) -> None:
        self.desc = desc
        self.total = total
        self.unit = unit
        self.stream = sys.stderr if stream is None else stream
        self.enabled = progress_enabled(self.stream) if enabled is None else bool(enabled)
        self._tty = self.enabled and _isatty(self.stream)
        self.done = 0
        self.note = ""
        self._t0 = time.perf_counter()
        self._last = None  # time of the last line printed
        self._closed = False
        self._staged = False

    # ------------------------------------------------------------------ counting
    def update(self, n: int = 1, note: str | None = None) -> None:
        """Add ``n`` units done (and set the trailing note), printing if it is time."""
        self.done += n
        if note is not None:
            self.note = note
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._last is None or now - self._last >= MIN_INTERVAL:
            self._print(now, final=False)

    def stage(self, note: str) -> None:
        """Start the next named step (one unit each): ``progress.stage("saving")``. A new
        stage always prints (stages are seconds apart, the throttle is not needed)."""
        if self._staged:  # the previous stage is done
            self.done += 1
        self._staged = True
        self.note = note
        if self.enabled:
            self._print(time.perf_counter(), final=False)

    def message(self, text: str) -> None:
        """Print ``text`` on a line of its own, whether or not progress is enabled (a notice the
        user must see); on a terminal, above the progress line, which is then redrawn."""
        redraw = self._tty and self._last is not None and not self._closed
        try:
            self.stream.write(("\r\x1b[K" if redraw else "") + text + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            return
        if redraw:
            self._print(time.perf_counter(), final=False)

    def close(self) -> None:
        """Print the final line (see the class notes); idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._staged:  # the last stage is done
            self.done += 1
            self._staged = False
        now = time.perf_counter()
        if self._last is not None or now - self._t0 >= MIN_INTERVAL:
            self._print(now, final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._last is not None and self._tty:
            self.stream.write("\n")  # end the half-written line before the traceback
            self.stream.flush()

    # ------------------------------------------------------------------ printing
    def _print(self, now: float, final: bool) -> None:
        elapsed = now - self._t0
        count = _fmt_count(self.done) if self.total is None else f"{_fmt_count(self.done)}/{_fmt_count(self.total)}"
        parts = [f"{self.desc}: {count}" + (f" {self.unit}" if self.unit else "")]
        if self.total and not final:
            parts.append(f"{100.0 * self.done / self.total:.0f}%")
        if self.note and not final:
            parts.append(self.note)
        parts.append(f"{elapsed:.1f} s" + (", done" if final else ""))
        line = ", ".join(parts)
        try:
            if self._tty:
                self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream never breaks the work
            self.enabled = False
        self._last = now


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
