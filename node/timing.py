"""Per-stage wall-clock timing, shared by the CLI summary, the benchmark and the metrics."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Accumulates seconds per named stage: ``with clock("inference"): ...``.

    ``parts`` break a stage down (the backbone and each head inside ``inference``); they are
    reported next to the stages but not added to :attr:`total`, which would count them twice.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.parts: dict[str, float] = defaultdict(float)
        self.current: str | None = None  # the stage entered last: where an error happened

    def __call__(self, stage: str):
        self.current = stage
        return _timed(self.seconds, stage)

    def part(self, name: str):
        return _timed(self.parts, name)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@contextmanager
def _timed(into: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        into[key] += time.perf_counter() - t0
