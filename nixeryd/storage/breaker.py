"""Deadlines and a circuit breaker for calls to a remote store.

Every call gets a total deadline, retries included: past it the caller gets a
``StorageError`` (the call's thread finishes on its own, bounded by the client's own
timeouts). After ``threshold`` failures in a row the breaker opens: calls fail at once
with ``StorageUnavailable`` for ``cooldown`` seconds; then one call is let through as a
probe, and its success closes the breaker. A pull that needs the store then gets a 503
with ``Retry-After`` at once instead of waiting on a stalled bucket, while warm images,
which need no call, are served as before. Pure of the reactor: time is an injected clock.
"""
from __future__ import annotations

from typing import Callable, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from nixeryd.storage.interface import StorageError

log = Logger()

T = TypeVar("T")

CLOSED, OPEN, PROBING = "closed", "open", "probing"


class StorageUnavailable(StorageError):
    """The breaker is open: the store failed repeatedly and is not asked for now."""


class CircuitBreaker:
    def __init__(self, clock: IReactorTime, *, threshold: int = 5, cooldown: float = 10.0,
                 name: str = "storage") -> None:
        self._clock = clock
        self._threshold = threshold
        self._cooldown = cooldown
        self._name = name
        self._failures = 0
        self._opened_at = 0.0
        self.state = CLOSED

    def call(self, action: str, make: Callable[[], Deferred[T]], deadline: float) -> Deferred[T]:
        """``make()``'s result, failed with ``StorageError`` past ``deadline`` seconds, or at
        once while the breaker is open."""
        if self.state != CLOSED:
            waited = self._clock.seconds() - self._opened_at
            if self.state == PROBING or waited < self._cooldown:
                return fail(StorageUnavailable(
                    f"{action}: {self._name} is unavailable after repeated failures; "
                    f"trying again in {max(0.0, self._cooldown - waited):.0f} s"))
            self.state = PROBING  # this call is the probe

        def timed_out(result: object, timeout: float) -> None:
            raise StorageError(f"{action} did not finish within {timeout:.0f} s")

        d = make()
        d.addTimeout(deadline, self._clock, onTimeoutCancel=timed_out)
        return d.addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, result: T) -> T:
        if self.state != CLOSED:
            log.info("{name} answers again; calls resume", name=self._name)
        self.state, self._failures = CLOSED, 0
        return result

    def _failed(self, failure: Failure) -> Failure:
        if failure.check(StorageError):
            self._failures += 1
            if self.state == PROBING or self._failures >= self._threshold:
                if self.state != OPEN:
                    log.error("{name} failed {count} times in a row; not asked again for {cooldown:.0f} s",
                              name=self._name, count=self._failures, cooldown=self._cooldown)
                self.state, self._opened_at = OPEN, self._clock.seconds()
        return failure
