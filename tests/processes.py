"""Every long-running helper a test starts (nixeryd, the storage emulator, containerd,
dockerd) is stopped however the test ends.

Three layers, so that nothing outlives the run:
- each helper registers itself here the moment its process exists, before it is ready,
  and removes itself when it stops;
- ``stop_leftovers`` (autouse, imported by ``conftest.py``) stops, after every test, what
  that test started and did not stop: a failed ``start()`` of a second daemon no longer
  leaks the first; fixtures of a wider scope are left to their own teardown;
- ``stop_everything`` runs at the end of the session, and every helper is spawned with a
  parent-death signal, so even a killed pytest leaves no daemon behind.
"""
from __future__ import annotations

import ctypes
import os
import re
import select
import signal
from typing import Callable, Iterator, Protocol

import pytest

PR_SET_PDEATHSIG = 1


class Stoppable(Protocol):
    def stop(self) -> None: ...


RUNNING: list[Stoppable] = []
SESSION: list[Stoppable] = []


def register(helper: Stoppable) -> None:
    if helper not in RUNNING:
        RUNNING.append(helper)


def unregister(helper: Stoppable) -> None:
    if helper in RUNNING:
        RUNNING.remove(helper)


def keep_for_session(helper: Stoppable) -> None:
    """A helper shared by many tests: stopped at the end of the session, not of a test."""
    unregister(helper)
    if helper not in SESSION:
        SESSION.append(helper)


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` that asks the kernel to send ``sig`` to the child when the thread
    that started it ends (tests start helpers from the main thread, so: when pytest ends)."""

    def set_pdeathsig() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    return set_pdeathsig


def exited_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` is gone (or never was) within ``seconds``: waits on a pidfd,
    which becomes readable when the process ends; no polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], seconds)
        return bool(readable)
    finally:
        os.close(fd)


SLEEPER = re.compile(r"sleeping for good as pid (\d+)")
"""What the test package `hangs` prints: the pid of its builder."""


def stop_everything(helpers: list[Stoppable] | None = None) -> list[str]:
    """Stop the given helpers (default: all still running), newest first; return what
    failed to stop rather than raising half-way."""
    problems = []
    for helper in reversed(list(RUNNING if helpers is None else helpers)):
        try:
            helper.stop()
        except Exception as e:  # keep stopping the others
            problems.append(f"{helper!r}: {e}")
        unregister(helper)
    return problems


@pytest.fixture(autouse=True)
def stop_leftovers() -> Iterator[None]:
    """Stop whatever the test started and left running, pass or fail."""
    before = list(RUNNING)
    yield
    problems = stop_everything([h for h in RUNNING if h not in before])
    assert not problems, problems


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_everything(SESSION + RUNNING)
    SESSION.clear()
