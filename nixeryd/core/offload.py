"""Running blocking work off the reactor thread.

Everything that blocks (tar, gzip, hashing, directory walks, the
google-cloud-storage client) is handed to an ``Offload``: a thread pool in
production, an inline call in unit tests.
"""
from __future__ import annotations

import os
import threading
from functools import partial
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


def thread_pool(reactor: IReactorFromThreads, pool: ThreadPool, nice: int = 0) -> Offload:
    """An Offload that runs work in ``pool`` and fires on the reactor thread. With ``nice``,
    the pool's threads (and the threads they start: compression workers) run that much
    nicer than the process, so that the reactor thread wins the cores when it has requests
    to answer."""

    def offload(fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> Deferred[R]:
        if nice:
            return deferToThreadPool(reactor, pool, _niced, nice, partial(fn, *args, **kwargs))
        return deferToThreadPool(reactor, pool, fn, *args, **kwargs)

    return offload


_thread = threading.local()


def _niced(nice: int, call: Callable[[], R]) -> R:
    """Run ``call`` on this thread, made ``nice`` nicer than it was first (once a thread:
    Linux keeps a niceness a thread, and the threads a thread starts take its own)."""
    if not getattr(_thread, "niced", False):
        me = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, me, min(19, os.getpriority(os.PRIO_PROCESS, me) + nice))
        except OSError:
            pass  # a niceness this process may not set: the work runs all the same
        _thread.niced = True
    return call()
