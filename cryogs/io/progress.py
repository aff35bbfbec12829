"""How far a run is: one line per stage and per epoch, with the time elapsed and, once fitting has
started, the time left; on a terminal, labelled progress bars as well.

A log (stderr not a terminal, or ``--no-progress``) gets only the lines, flushed at once, so a
redirected run shows one line per epoch instead of every bar refresh. A terminal gets the same
lines above an overall bar of all the fitting steps planned (with tqdm's estimate of the time left)
and the bar of the current loop.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["Report", "duration"]


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"`` or ``"2 h 07 min"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Report:
    """A run's progress reports. ``enabled=False`` (processes other than the first) prints nothing;
    ``bars=False`` (``--no-progress``) keeps the lines and drops the bars, as does a stderr that is
    not a terminal.

    The time left counts fitting steps: :meth:`plan` adds the steps a run will take (all of them,
    both halves' included, before the first starts), :meth:`skip` those a resumed run had already
    done, and :meth:`advance` each step as it is taken; the rate is measured from the end of the first
    step taken here (set-up and the first step's warm-up excluded).
    """

    def __init__(self, *, bars: bool = True, enabled: bool = True):
        self.enabled = enabled
        self.bars = bars and enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.total = 0  # fitting steps planned
        self.done = 0  # fitting steps done, before this process included
        self._clock: tuple[float, int] | None = None  # (time, done) at the first step taken here
        self._overall = None

    def line(self, message: str, *, eta: bool = False) -> None:
        """Print ``[elapsed] message`` (and the time left, with ``eta``, once it can be estimated)."""
        if not self.enabled:
            return
        left = self.time_left() if eta else None
        text = f"[{duration(time.perf_counter() - self.start)}] {message}"
        if left is not None:
            text += f"; about {duration(left)} left"
        if self.bars:
            tqdm.write(text, file=sys.stdout)  # above the bars, which are on stderr
        else:
            print(text, flush=True)

    def bar(self, desc: str, total: int, initial: int = 0):
        """A labelled bar for one loop (an epoch, a backprojection); disabled in a log."""
        return tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not self.bars,
                    position=1 if self._overall is not None else 0, dynamic_ncols=True)

    def plan(self, steps: int) -> None:
        self.total += steps
        if self.bars:
            if self._overall is None:
                self._overall = tqdm(total=self.total, initial=self.done, desc="all fitting", unit="step",
                                     position=0, dynamic_ncols=True)
            else:
                self._overall.total = self.total
                self._overall.refresh()

    def skip(self, steps: int) -> None:
        """Steps done by the run before it was resumed (they do not count towards the rate)."""
        self.done += steps
        if self._overall is not None:
            self._overall.update(steps)

    def advance(self, steps: int = 1) -> None:
        self.done += steps
        if self._clock is None:
            self._clock = (time.perf_counter(), self.done)
        if self._overall is not None:
            self._overall.update(steps)

    def time_left(self) -> float | None:
        """Seconds until the planned steps are done, at the rate since the first step (None before two)."""
        if self._clock is None or self.done <= self._clock[1]:
            return None
        t0, done0 = self._clock
        return (time.perf_counter() - t0) / (self.done - done0) * max(0, self.total - self.done)

    def close(self) -> None:
        if self._overall is not None:
            self._overall.close()
            self._overall = None
