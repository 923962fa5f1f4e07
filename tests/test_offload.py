"""Work handed off the reactor: to a real thread pool, at a niceness of its own for packing."""
from __future__ import annotations

import os
import threading

import pytest_twisted
from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool

from nixeryd.core.offload import thread_pool


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _niceness_here_and_of_a_thread_started_here() -> tuple[int, int, str]:
    started: list[int] = []
    child = threading.Thread(target=lambda: started.append(_niceness()))
    child.start()
    child.join()
    return _niceness(), started[0], threading.current_thread().name


@pytest_twisted.ensureDeferred
async def test_a_niced_pool_runs_its_work_and_the_threads_it_starts_niced() -> None:
    """Packing's pool runs at niceness 10, and so do the compression workers its threads
    start; the reactor's thread and another pool keep the process's own."""
    own = _niceness()
    niced_pool, plain_pool = ThreadPool(0, 2, "test-niced"), ThreadPool(0, 2, "test-plain")
    niced_pool.start()
    plain_pool.start()
    try:
        niced = thread_pool(reactor, niced_pool, nice=own + 10)
        plain = thread_pool(reactor, plain_pool)
        for _ in range(3):  # once a thread, and every time after
            here, child, name = await niced(_niceness_here_and_of_a_thread_started_here)
            assert (here, child) == (own + 10, own + 10) and "test-niced" in name
        here, child, _ = await plain(_niceness_here_and_of_a_thread_started_here)
        assert (here, child) == (own, own)
        assert _niceness() == own
        assert await niced(sum, [1, 2, 3]) == 6
    finally:
        niced_pool.stop()
        plain_pool.stop()
