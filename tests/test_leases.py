"""Build leases: one build per image across instances sharing storage.

Two ``BuildLeases`` on one ``MemoryStorage`` stand for two instances on one
bucket; a ``Clock`` stands for time. The end-to-end tests with real instances
on a shared directory, an emulator bucket and a moto bucket are in
``test_fleet.py``.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.build.failures import NixBuildFailed, NixTimedOut, PackagesNotFound
from nixeryd.registry.leases import BuildLeases, WaitedTooLong
from nixeryd.storage.interface import ABSENT
from nixeryd.storage.records import LeaseRecord
from tests.memory import MemoryStorage

KEY = hashlib.sha256(b"an image").hexdigest()
LEASE = "leases/" + KEY


class Fleet:
    """Shared storage, a clock, and a record of what was built and where."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.storage = MemoryStorage(now=self.clock.seconds)
        self.finished: str | None = None  # the "manifest record"
        self.builds: list[str] = []

    def instance(self, name: str, **kwargs: Any) -> BuildLeases:
        kwargs.setdefault("ttl", 30.0)
        kwargs.setdefault("failure_ttl", 60.0)
        kwargs.setdefault("wait_limit", 600.0)
        return BuildLeases(self.storage, self.clock, holder=name, **kwargs)

    def pull(self, leases: BuildLeases, until: Deferred[None] | None = None,
             error: Exception | None = None) -> Deferred[str]:
        async def build() -> str:
            self.builds.append(leases.holder)
            if until is not None:
                await until
            if error is not None:
                raise error
            self.finished = "digest-by-" + leases.holder
            return self.finished

        async def done() -> str | None:
            return self.finished

        return Deferred.fromCoroutine(leases.build_once(KEY, build, done))

    def lease(self) -> LeaseRecord | None:
        found = self.storage.read(LEASE).result
        return None if found is None else LeaseRecord.decode(found[0])

    def run(self, seconds: float, step: float = 0.25) -> None:
        for _ in range(int(seconds / step)):
            self.clock.advance(step)


class BuildLeaseTests(SynchronousTestCase):
    def test_one_builds_and_the_other_waits_for_its_result(self) -> None:
        """While A builds, B polls; when A's record appears B answers with it, never building."""
        fleet = Fleet()
        release: Deferred[None] = Deferred()
        a = fleet.pull(fleet.instance("A"), until=release)
        b = fleet.pull(fleet.instance("B"))
        fleet.run(20)
        self.assertNoResult(b)
        self.assertEqual(fleet.builds, ["A"])
        lease = fleet.lease()
        assert lease is not None
        self.assertEqual((lease.state, lease.holder), ("building", "A"))
        release.callback(None)
        self.assertEqual(self.successResultOf(a), "digest-by-A")
        self.assertIsNone(fleet.lease(), "the holder removes its lease when done")
        fleet.run(6)
        self.assertEqual(self.successResultOf(b), "digest-by-A")
        self.assertEqual(fleet.builds, ["A"])

    def test_renewal_comes_every_third_of_a_period(self) -> None:
        """The holder renews its lease a third of a period after taking it, long before it
        would expire: a lease renewed only as often as it expires would look dead to a
        waiter at each period's end."""
        fleet = Fleet()
        release: Deferred[None] = Deferred()
        fleet.pull(fleet.instance("A", ttl=30.0), until=release)
        taken = fleet.lease()
        assert taken is not None
        fleet.run(9.5)
        self.assertEqual(fleet.lease(), taken)
        fleet.run(1.0)
        renewed = fleet.lease()
        assert renewed is not None
        self.assertGreater(renewed.expires, taken.expires)
        release.callback(None)

    def test_holder_renews_while_building(self) -> None:
        """A build running for many lease periods keeps its lease: nobody takes it over."""
        fleet = Fleet()
        release: Deferred[None] = Deferred()
        a = fleet.pull(fleet.instance("A", ttl=3.0), until=release)
        b = fleet.pull(fleet.instance("B", ttl=3.0))
        fleet.run(60)
        self.assertEqual(fleet.builds, ["A"])
        lease = fleet.lease()
        assert lease is not None
        self.assertGreater(lease.expires, fleet.clock.seconds())
        release.callback(None)
        fleet.run(6)
        self.assertEqual(self.successResultOf(a), self.successResultOf(b))

    def test_lease_of_a_dead_holder_is_taken_over(self) -> None:
        """A holder that died (its lease no longer renewed) loses it at expiry; a waiting
        instance takes the build over."""
        fleet = Fleet()
        dead = LeaseRecord("building", "dead-host:123:abcd", fleet.clock.seconds() + 30)
        fleet.storage.write_if(LEASE, dead.encode(), "application/json", ABSENT)
        b = fleet.pull(fleet.instance("B"))
        fleet.run(25)
        self.assertNoResult(b)
        self.assertEqual(fleet.builds, [])
        fleet.run(10)
        self.assertEqual(self.successResultOf(b), "digest-by-B")
        self.assertEqual(fleet.builds, ["B"])
        self.flushLoggedErrors()

    def test_a_dead_process_of_this_host_loses_its_lease_at_once(self) -> None:
        """After a kill -9 and a restart, the lease of this host's dead process (or of the
        process before us with our id) is taken at the first look, not after its period; a
        live process's, and another host's, are waited for."""
        import os

        from nixeryd.registry.leases import THIS_HOST

        for holder in (f"{THIS_HOST}:{2**22 + 7}:abcd", f"{THIS_HOST}:{os.getpid()}:0000"):
            fleet = Fleet()
            record = LeaseRecord("building", holder, fleet.clock.seconds() + 3600, ttl=60)
            fleet.storage.write_if(LEASE, record.encode(), "application/json", ABSENT)
            b = fleet.pull(fleet.instance("B"))
            fleet.run(0.25)
            self.assertEqual(self.successResultOf(b), "digest-by-B", holder)
        for holder in (f"{THIS_HOST}:1:abcd", f"elsewhere:{2**22 + 7}:abcd"):
            fleet = Fleet()
            record = LeaseRecord("building", holder, fleet.clock.seconds() + 3600, ttl=60)
            fleet.storage.write_if(LEASE, record.encode(), "application/json", ABSENT)
            b = fleet.pull(fleet.instance("B"))
            fleet.run(10)
            self.assertNoResult(b)
            self.assertEqual(fleet.builds, [], holder)
        self.flushLoggedErrors()

    def test_unreadable_lease_is_taken_over(self) -> None:
        """A lease record that cannot be read counts as expired: it never blocks a build."""
        fleet = Fleet()
        fleet.storage.put(LEASE, b"\x00not json", "application/json")
        self.assertEqual(self.successResultOf(fleet.pull(fleet.instance("B"))), "digest-by-B")

    def test_failure_is_shared_then_forgotten(self) -> None:
        """A's failure is written in its lease's place: B, asking after, gets the same error
        without building; once the failure TTL is over, the next pull builds again."""
        fleet = Fleet()
        a = fleet.pull(fleet.instance("A"), error=NixBuildFailed("cannot build broken-1.0", "tail", "why",
                                                                 "/nix/store/x-broken-1.0.drv"))
        failure = self.failureResultOf(a, NixBuildFailed)
        b = fleet.pull(fleet.instance("B"))
        shared = self.failureResultOf(b, NixBuildFailed).value
        self.assertEqual((shared.message, shared.derivation, shared.summary, shared.log_tail),
                         (failure.value.message, "/nix/store/x-broken-1.0.drv", "why", "tail"))
        self.assertEqual(fleet.builds, ["A"])
        fleet.clock.advance(61)
        self.assertEqual(self.successResultOf(fleet.pull(fleet.instance("B"))), "digest-by-B")

    def test_names_not_in_the_set_leave_nothing_in_storage(self) -> None:
        """Anyone can make names up: their failure is not written for the fleet, and the
        lease is gone once the build failed."""
        fleet = Fleet()
        a = fleet.pull(fleet.instance("A"), error=PackagesNotFound("no such package", "tail", ["nope"], "why"))
        self.failureResultOf(a, PackagesNotFound)
        self.assertIsNone(fleet.lease())
        self.assertEqual(self.successResultOf(fleet.pull(fleet.instance("B"))), "digest-by-B")

    def test_waiters_get_the_failure_when_it_happens(self) -> None:
        """An instance waiting on a build that then fails gets that failure, of the same kind."""
        fleet = Fleet()
        release: Deferred[None] = Deferred()
        a = fleet.pull(fleet.instance("A"), until=release, error=NixTimedOut("ran out of time"))
        b = fleet.pull(fleet.instance("B"))
        fleet.run(3)
        release.callback(None)
        self.failureResultOf(a, NixTimedOut)
        fleet.run(6)
        self.assertEqual(self.failureResultOf(b, NixTimedOut).value.message, "ran out of time")
        self.assertEqual(fleet.builds, ["A"])

    def test_no_failure_memory_means_no_failure_record(self) -> None:
        """With the failure TTL at 0 a failed build leaves nothing: the next pull builds."""
        fleet = Fleet()
        self.failureResultOf(fleet.pull(fleet.instance("A", failure_ttl=0), error=NixBuildFailed("x")))
        self.assertIsNone(fleet.lease())
        self.successResultOf(fleet.pull(fleet.instance("B", failure_ttl=0)))
        self.assertEqual(fleet.builds, ["A", "B"])

    def test_other_errors_release_the_lease(self) -> None:
        """A build that fails for a reason other than Nix (storage, say) removes its lease
        and records nothing: another instance may try at once."""
        fleet = Fleet()
        self.failureResultOf(fleet.pull(fleet.instance("A"), error=RuntimeError("bucket gone")), RuntimeError)
        self.assertIsNone(fleet.lease())

    def test_waiting_is_bounded(self) -> None:
        """A waiter gives up after the wait limit with a storage error (a 503 to the client),
        even when the holder keeps renewing."""
        fleet = Fleet()
        a = fleet.pull(fleet.instance("A", ttl=3.0), until=Deferred())
        b = fleet.pull(fleet.instance("B", ttl=3.0, wait_limit=100.0))
        fleet.run(99)
        self.assertNoResult(b)
        fleet.run(10)
        self.assertIn("A has been building", str(self.failureResultOf(b, WaitedTooLong).value))
        self.assertNoResult(a)

    def test_a_holder_whose_clock_is_behind_keeps_its_lease(self) -> None:
        """A holder whose clock is five minutes behind writes expiries already past by the
        waiter's clock; it keeps renewing, so the waiter does not take over."""
        fleet = Fleet()
        behind = Clock()
        behind.advance(fleet.clock.seconds() - 300)
        release: Deferred[None] = Deferred()
        holder = BuildLeases(fleet.storage, behind, ttl=30.0, holder="A")
        a = fleet.pull(holder, until=release)
        b = fleet.pull(fleet.instance("B"))
        for _ in range(600):
            fleet.clock.advance(0.25)
            behind.advance(0.25)
        self.assertEqual(fleet.builds, ["A"])
        self.assertNoResult(b)
        release.callback(None)
        for _ in range(24):
            fleet.clock.advance(0.25)
        self.assertEqual(self.successResultOf(a), self.successResultOf(b))

    def test_a_dead_holder_whose_clock_was_ahead_is_taken_over_within_a_period(self) -> None:
        """A dead holder's clock was an hour ahead: its lease seems to expire an hour from
        now, but the waiter, seeing it unchanged for a whole period, takes over then."""
        fleet = Fleet()
        ahead = LeaseRecord("building", "dead:1:x", fleet.clock.seconds() + 3600 + 30, ttl=30.0)
        fleet.storage.write_if(LEASE, ahead.encode(), "application/json", ABSENT)
        b = fleet.pull(fleet.instance("B"))
        fleet.run(28)
        self.assertNoResult(b)
        fleet.run(4)
        self.assertEqual(self.successResultOf(b), "digest-by-B")

    def test_lease_long_past_its_expiry_is_taken_at_once(self) -> None:
        """A lease an hour past its expiry (its holder died long ago) is taken over at the
        first look, without watching it for a period."""
        fleet = Fleet()
        old = LeaseRecord("building", "dead:1:x", fleet.clock.seconds() - 3600, ttl=30.0)
        fleet.storage.write_if(LEASE, old.encode(), "application/json", ABSENT)
        self.assertEqual(self.successResultOf(fleet.pull(fleet.instance("B"))), "digest-by-B")

    def test_lease_record_names_holder_and_expiry(self) -> None:
        """The stored record is JSON with the holder and an absolute expiry time."""
        fleet = Fleet()
        a = fleet.pull(fleet.instance("A", ttl=30.0), until=Deferred())
        data, _ = fleet.storage.read(LEASE).result
        doc = json.loads(data)
        self.assertEqual(doc, {"state": "building", "holder": "A", "expires": fleet.clock.seconds() + 30.0,
                               "ttl": 30.0})
        self.assertNoResult(a)
