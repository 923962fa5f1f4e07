"""What is building now and what failed lately, for the index page. Pure."""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class BuildFailure:
    """A build that failed."""

    when: float
    image: str
    tag: str
    message: str
    summary: str = ""  # one line saying why, read first
    kind: str = "failed"  # as counted in metrics: not_found, timed_out, source, platform, failed


class Activity:
    """Builds under way (by a number of their own: two builds may share a label) and the
    last ``keep`` failures."""

    def __init__(self, keep: int = 20) -> None:
        self._running: dict[int, tuple[str, float]] = {}
        self._numbers = itertools.count()
        self.failures: deque[BuildFailure] = deque(maxlen=keep)

    def started(self, label: str, when: float) -> int:
        number = next(self._numbers)
        self._running[number] = (label, when)
        return number

    def ended(self, number: int) -> None:
        self._running.pop(number, None)

    def failed(self, failure: BuildFailure) -> None:
        self.failures.append(failure)

    @property
    def active(self) -> dict[str, float]:
        """Builds running or waiting: image label -> when the build started, oldest first."""
        return dict(sorted(self._running.values(), key=lambda build: build[1]))
