"""Running blocking work off the reactor thread.

Everything that blocks (tar, gzip, hashing, directory walks, the
google-cloud-storage client) is handed to an ``Offload``: a thread pool in
production, an inline call in unit tests.
"""
from __future__ import annotations

from typing import Callable, ParamSpec, Protocol, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
R = TypeVar("R")


class Offload(Protocol):
    """Runs ``fn(*args, **kwargs)`` off the reactor; the Deferred fires on the reactor
    thread with its result, typed as ``fn`` returns it."""

    def __call__(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]: ...


def inline(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]:
    """Run ``fn`` at once on the calling thread; for tests."""
    return maybeDeferred(fn, *args, **kwargs)


def thread_pool(reactor: IReactorFromThreads, pool: ThreadPool) -> Offload:
    """An Offload that runs work in ``pool`` and fires on the reactor thread."""

    def offload(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]:
        return deferToThreadPool(reactor, pool, fn, *args, **kwargs)

    return offload
