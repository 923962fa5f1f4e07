"""The live tail of every build's Nix log, gathered from build-log events."""
from __future__ import annotations

from collections import OrderedDict, deque

from twisted.logger import ILogObserver, LogEvent
from zope.interface import implementer


@implementer(ILogObserver)
class BuildLogs:
    """Keeps the last lines Nix printed for the most recent builds."""

    def __init__(self, lines: int = 20, builds: int = 50) -> None:
        self._lines = lines
        self._builds = builds
        self._tails: OrderedDict[str, deque[str]] = OrderedDict()

    def __call__(self, event: LogEvent) -> None:
        if not event.get("build_log"):
            return
        image, line = event.get("image"), event.get("line")
        if not isinstance(image, str) or not isinstance(line, str):
            return
        tail = self._tails.pop(image, None) or deque(maxlen=self._lines)
        tail.append(line)
        self._tails[image] = tail
        while len(self._tails) > self._builds:
            self._tails.popitem(last=False)

    def tail(self, image: str) -> list[str]:
        return list(self._tails.get(image, ()))
