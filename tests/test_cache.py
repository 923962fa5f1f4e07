"""Single-flight work and the in-memory manifest cache."""
from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.core.cache import SingleFlight, TTLCache


class SingleFlightTests(SynchronousTestCase):
    def test_one_run_per_key_each_caller_its_own_result(self) -> None:
        """Callers of a running key share one run and each get the result."""
        flight: SingleFlight[str] = SingleFlight()
        started: list[Deferred[str]] = []

        def work() -> Deferred[str]:
            d: Deferred[str] = Deferred()
            started.append(d)
            return d

        first = flight.run("k", work)
        second = flight.run("k", work)
        self.assertIsNot(first, second)
        self.assertEqual(len(started), 1)
        self.assertEqual(len(flight), 1)
        started[0].callback("done")
        self.assertEqual(self.successResultOf(first), "done")
        self.assertEqual(self.successResultOf(second), "done")
        self.assertEqual(len(flight), 0)

    def test_failure_reaches_every_caller(self) -> None:
        """A failed run fails every caller waiting for it."""
        flight: SingleFlight[str] = SingleFlight()
        gate: Deferred[str] = Deferred()
        callers = [flight.run("k", lambda: gate) for _ in range(3)]
        gate.errback(ValueError("boom"))
        for d in callers:
            self.failureResultOf(d, ValueError)

    def test_cancelling_one_caller_keeps_the_work(self) -> None:
        """A caller that goes away does not cancel the work for the others."""
        flight: SingleFlight[str] = SingleFlight()
        gate: Deferred[str] = Deferred()
        leaving = flight.run("k", lambda: gate)
        staying = flight.run("k", lambda: gate)
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        gate.callback("built")
        self.assertEqual(self.successResultOf(staying), "built")

    def test_a_failure_nobody_waits_for_is_logged(self) -> None:
        """When every caller went away, the work's failure is logged with its traceback
        rather than lost; one someone waits for goes to them alone."""
        flight: SingleFlight[str] = SingleFlight()
        gate: Deferred[str] = Deferred()
        leaving = flight.run("k", lambda: gate)
        leaving.cancel()
        self.failureResultOf(leaving, CancelledError)
        gate.errback(ValueError("nobody saw this"))
        self.assertEqual([str(f.value) for f in self.flushLoggedErrors(ValueError)], ["nobody saw this"])
        other: Deferred[str] = Deferred()
        waited = flight.run("j", lambda: other)
        other.errback(ValueError("seen"))
        self.failureResultOf(waited, ValueError)
        self.assertEqual(self.flushLoggedErrors(ValueError), [])

    def test_a_new_run_after_the_last_finished(self) -> None:
        """Once a run is over, the next caller starts a new one."""
        flight: SingleFlight[int] = SingleFlight()
        runs: list[int] = []

        def work() -> Deferred[int]:
            runs.append(1)
            d: Deferred[int] = Deferred()
            d.callback(len(runs))
            return d

        self.assertEqual(self.successResultOf(flight.run("k", work)), 1)
        self.assertEqual(self.successResultOf(flight.run("k", work)), 2)


class TTLCacheTests(SynchronousTestCase):
    def test_entries_expire_after_their_ttl(self) -> None:
        """An entry with a TTL is gone once the clock passes it; one without stays."""
        clock = Clock()
        cache: TTLCache[str] = TTLCache(clock)
        cache.put("moving", "sha256:a", 60)
        cache.put("pinned", "sha256:b", None)
        clock.advance(59)
        self.assertEqual(cache.get("moving"), "sha256:a")
        clock.advance(1)
        self.assertIsNone(cache.get("moving"))
        clock.advance(10**6)
        self.assertEqual(cache.get("pinned"), "sha256:b")

    def test_least_recently_used_goes_first(self) -> None:
        """Past its bound the cache drops the entry used least recently."""
        cache: TTLCache[str] = TTLCache(Clock(), max_entries=2)
        cache.put("a", "1", None)
        cache.put("b", "2", None)
        cache.get("a")
        cache.put("c", "3", None)
        self.assertEqual((cache.get("a"), cache.get("b"), cache.get("c")), ("1", None, "3"))
