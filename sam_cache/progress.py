"""One progress display for every long job: a live bar on a terminal, plain lines in a file.

rich draws its bar in place, so where the output is a file (``nohup``, a SLURM log, a pipe) a bar
shows once, when the job ends: an hour of extraction said nothing for an hour. Here a job whose
console is not a terminal writes a line when it starts, then at most one every ``interval``
seconds, and one when it ends::

    extract litemedsam: 0/780
    extract litemedsam: 112/780 (14 %), 0.23 img/s, 0:08:07 elapsed, eta 0:48:24
    extract litemedsam: 780/780 (100 %), 0.23 img/s, 0:56:31 elapsed

Every command and library function that shows progress goes through :func:`progress`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Bar:
    """The handle :func:`progress` yields: count work done with :meth:`advance` or :meth:`set`.
    This base shows nothing (progress disabled, or a transient bar in a file)."""

    def __init__(self, label: str, total: int, unit: str = ""):
        self.label, self.total, self.unit = label, int(total), unit
        self.completed = 0
        self._t0 = time.perf_counter()

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.set(self.completed + n)

    def set(self, completed: int) -> None:
        """Set the count of units done to ``completed``."""
        self.completed = int(completed)
        self._show(time.perf_counter())

    def rate(self, now: float | None = None) -> float:
        """Units a second since the bar opened."""
        return self.completed / max((now or time.perf_counter()) - self._t0, 1e-9)

    def _show(self, now: float) -> None:
        pass


class _LiveBar(Bar):
    """A rich bar on a terminal, drawn by ``draw(completed, rate)``."""

    def __init__(self, label: str, total: int, unit: str, draw: Callable[[int, float], None]):
        super().__init__(label, total, unit)
        self._draw = draw

    def _show(self, now: float) -> None:
        self._draw(self.completed, self.rate(now))


class _LineBar(Bar):
    """Plain lines through ``write``: one now, one at most every ``interval`` seconds, one at the end."""

    def __init__(self, label: str, total: int, unit: str, write: Callable[[str], None], interval: float):
        super().__init__(label, total, unit)
        self._write, self._interval = write, interval
        self._said = -1  # the count the last line showed
        self._line(self._t0)  # the start: the job is running, and how much it has to do

    def _show(self, now: float) -> None:
        if now - self._last >= self._interval or self.completed >= self.total:
            self._line(now)

    def _line(self, now: float) -> None:
        self._last, self._said = now, self.completed
        text = f"{self.label}: {self.completed}/{self.total}"
        if self.completed:
            elapsed, rate = now - self._t0, self.rate(now)
            text += f" ({100 * self.completed / max(self.total, 1):.0f} %)"
            if self.unit:
                text += f", {rate:.2f} {self.unit}/s"
            text += f", {_clock(elapsed)} elapsed"
            if self.completed < self.total:
                text += f", eta {_clock((self.total - self.completed) / rate)}"
        self._write(text)

    def close(self) -> None:
        """The end line, unless the last line already showed this count."""
        if self._said != self.completed:
            self._line(time.perf_counter())


@contextlib.contextmanager
def progress(label: str, total: int, *, enabled: bool = True, unit: str = "", transient: bool = False,
             console=None, interval: float = 30.0) -> Iterator[Bar]:
    """Show the progress of ``total`` units of work while the ``with`` block runs.

    Arguments:
      label: what the job is (``"extract litemedsam"``); the start of every line.
      total: the units of work (images, rows, epochs).
      enabled: False shows nothing.
      unit: the unit's name (``"img"``); given, the rate is shown as ``unit/s``.
      transient: a bar for a terminal only, erased when done (an epoch's steps); in a file
        it writes nothing.
      console: the ``rich.console.Console`` to show it on (default: standard output's).
      interval: seconds between lines in a file.

    Yields:
      A :class:`Bar`. Lines are written where ``console`` is not a terminal, a live rich bar
      where it is.
    """
    from rich.console import Console

    console = console or Console()
    if not enabled or (transient and not console.is_terminal):
        yield Bar(label, total, unit)
        return
    if not console.is_terminal:
        def write(text: str) -> None:
            console.file.write(text + "\n")
            console.file.flush()

        bar = _LineBar(label, total, unit, write, interval)
        try:
            yield bar
        finally:
            bar.close()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn("{task.fields[rate]:>7.2f} " + unit + "/s"))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=transient) as live:
        task = live.add_task(label, total=total, rate=0.0)
        yield _LiveBar(label, total, unit, lambda done, rate: live.update(task, completed=done, rate=rate))
