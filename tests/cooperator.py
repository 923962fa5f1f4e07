"""Files served through ``twisted.web.static.File`` under ``StubTreq``.

Twisted streams a file to a client that pulls through the global cooperator, which only
runs on the real reactor: under ``StubTreq`` such a response never ends. As tahoe-lafs
does, the cooperator is pointed at one scheduled on a ``Clock`` for the duration, and
``pump`` runs it (and StubTreq's transports) until nothing is left to do.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from treq.testing import StubTreq
from twisted.internet import task


@contextmanager
def clocked_cooperator(treq: StubTreq) -> Iterator[Callable[[], None]]:
    clock = task.Clock()
    cooperator = task.Cooperator(scheduler=lambda work: clock.callLater(0, work))
    saved = task._theCooperator
    task._theCooperator = cooperator

    def pump() -> None:
        for _ in range(10_000):
            treq.flush()
            if not clock.getDelayedCalls():
                return
            clock.advance(0)
        raise AssertionError("the response never ended")

    try:
        yield pump
    finally:
        task._theCooperator = saved
        cooperator.stop()
