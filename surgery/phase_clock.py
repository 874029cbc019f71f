"""Wall time per phase of a ``surgery apply`` run, for the report and the closing log line.

A run's time is more than its training stages: loading (or converting) the teacher, sampling and
tokenizing the corpus, the held-out evaluations, compiling, saving. :class:`PhaseClock` adds up
wall seconds per named phase; repeated phases (the evaluations) accumulate. Times are this
process's: a resumed run reports what it spent since it resumed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseClock:
    """``with clock("data"): ...`` adds the block's wall seconds to phase ``"data"``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - t0)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def to_dict(self) -> dict[str, float]:
        """Seconds per phase in the order first timed, then ``other`` (untimed) and ``total`` since creation."""
        total = time.perf_counter() - self.start
        timed = {k: round(v, 3) for k, v in self.seconds.items()}
        return {**timed, "other": round(max(0.0, total - sum(self.seconds.values())), 3), "total": round(total, 3)}

    def summary(self) -> str:
        """One line: ``teacher 13 s, data 95 s, ..., total 7 min 12 s``."""
        return ", ".join(f"{k.replace('_', ' ')} {_human(v)}" for k, v in self.to_dict().items())


def _human(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec:02d} s"
