"""Deadlines and the circuit breaker for remote storage calls, on a Clock."""
from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.storage.breaker import CLOSED, OPEN, CircuitBreaker, StorageUnavailable
from nixeryd.storage.interface import StorageError


class BreakerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.breaker = CircuitBreaker(self.clock, threshold=3, cooldown=10)
        self.calls = 0

    def call(self, outcome: str, deadline: float = 20) -> Deferred[Any]:
        def make() -> Deferred[Any]:
            self.calls += 1
            if outcome == "ok":
                return succeed("ok")
            if outcome == "fail":
                return fail(StorageError("the bucket said no"))
            return Deferred()  # never answers

        return self.breaker.call("reading x", make, deadline)

    def test_a_call_past_its_deadline_fails(self) -> None:
        """A call that does not answer fails with StorageError at its deadline, not later."""
        d = self.call("stall", deadline=20)
        self.clock.advance(19.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertIn("did not finish within 20 s", str(self.failureResultOf(d, StorageError).value))

    def test_repeated_failures_open_it_and_calls_fail_at_once(self) -> None:
        """After threshold failures in a row, calls fail at once without reaching the store."""
        for _ in range(3):
            self.failureResultOf(self.call("fail"), StorageError)
        self.assertEqual(self.breaker.state, OPEN)
        self.failureResultOf(self.call("ok"), StorageUnavailable)
        self.failureResultOf(self.call("stall"), StorageUnavailable)
        self.assertEqual(self.calls, 3)

    def test_stalls_count_as_failures(self) -> None:
        """Calls that time out open the breaker too: a stalled bucket costs each caller at
        most one deadline, and later ones nothing."""
        pending = [self.call("stall", deadline=5) for _ in range(3)]
        self.clock.advance(5)
        for d in pending:
            self.failureResultOf(d, StorageError)
        self.failureResultOf(self.call("stall"), StorageUnavailable)

    def test_a_probe_after_the_cooldown_closes_it(self) -> None:
        """After the cooldown one call goes through; while it runs others still fail fast;
        its success closes the breaker."""
        for _ in range(3):
            self.failureResultOf(self.call("fail"), StorageError)
        self.clock.advance(10)
        probe: Deferred[str] = Deferred()
        d = self.breaker.call("probing", lambda: probe, 20)
        self.failureResultOf(self.call("ok"), StorageUnavailable)
        probe.callback("ok")
        self.assertEqual(self.successResultOf(d), "ok")
        self.assertEqual(self.breaker.state, CLOSED)
        self.assertEqual(self.successResultOf(self.call("ok")), "ok")

    def test_a_failed_probe_opens_it_again(self) -> None:
        """A probe that fails opens the breaker for another cooldown."""
        for _ in range(3):
            self.failureResultOf(self.call("fail"), StorageError)
        self.clock.advance(10)
        self.failureResultOf(self.call("fail"), StorageError)
        self.assertEqual(self.breaker.state, OPEN)
        self.clock.advance(9)
        self.failureResultOf(self.call("ok"), StorageUnavailable)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(self.call("ok")), "ok")

    def test_successes_reset_the_count(self) -> None:
        """Failures must come in a row to open it."""
        for outcome in ("fail", "fail", "ok", "fail", "fail", "ok"):
            self.call(outcome).addErrback(lambda failure: failure.trap(StorageError))
        self.assertEqual(self.breaker.state, CLOSED)
