"""One build of an image across every instance on the same storage.

Before building an image, an instance takes a lease on its cache key in storage
itself: ``leases/<cachekey>``, written with a precondition (only if absent, or
only if still the expired version it read), so that of any number of instances
exactly one holds it. The record names the holder and when the lease expires;
the holder renews it while Nix runs, so a holder that dies (SIGKILL, a lost
machine) stops renewing and another instance takes the lease over. Clocks of
different machines may disagree, so a waiter does not trust the expiry alone: a
lease is dead when the waiter has seen the same version of it for a whole lease
period by its own clock, or when its expiry is more than ``CLOCK_SLACK`` (or a
period, if longer) past: clocks up to that far apart never make a live lease
look dead, and a lease whose holder died long ago is taken at the first look.
The others wait for the image's manifest record instead of building, polling
with backoff, for no longer than a build may take.

When the build fails the holder replaces its lease with the failure (its kind,
message and Nix's output) for the failure TTL: every instance answers with it
rather than running the same broken build again. Names not in the package set are
the exception: anyone can make them up, so they are remembered by each instance
alone and their lease is removed, leaving nothing in storage. When it succeeds the holder
writes the manifest record first and only then removes the lease, so a waiter
that finds no lease finds the record.
"""
from __future__ import annotations

import os
import secrets
import socket
from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from nixeryd.build.failures import NixError, PackagesNotFound, failure_error, failure_record
from nixeryd.storage import records
from nixeryd.storage.interface import ABSENT, Generation, IStorage, StorageError
from nixeryd.storage.records import JSON, LeaseRecord

log = Logger()

T = TypeVar("T")

CLOCK_SLACK = 600.0
"""How far apart the clocks of a fleet's machines may be, in seconds, before a live
lease could look dead to a waiter (it would then build too: wasted work, never a
wrong image)."""
FIRST_POLL = 0.25
BRISK_POLL = 1.0
LAST_POLL = 5.0
BRISK_WAIT = 60.0
"""Waiters poll at least every BRISK_POLL seconds for the first BRISK_WAIT seconds (most
builds are done by then, and a poll is one small read), then every LAST_POLL."""


def _this_host() -> str:
    """This host as lease records name it: its name, and its process id namespace (two
    containers may share a name and not see each other's processes)."""
    try:
        namespace = f"~{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        namespace = ""
    return socket.gethostname().replace(":", "_") + namespace


THIS_HOST = _this_host()


def holder_name() -> str:
    """This process, as lease records name it: host, process id, and a random part
    (a restarted process may get the same id)."""
    return f"{THIS_HOST}:{os.getpid()}:{secrets.token_hex(4)}"


def gone_from_here(holder: str, me: str) -> bool:
    """Whether ``holder`` was a process of this host that is no longer running (killed, or
    an earlier process whose id this one got): its lease can be taken at once, without
    waiting out its period."""
    parts = holder.split(":")
    if len(parts) < 3 or holder == me:
        return False
    host, pid_text = ":".join(parts[:-2]), parts[-2]
    if host != THIS_HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # our id, but not us: the process before us
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _dead(record: LeaseRecord, now: float, unchanged: float) -> bool:
    """Whether a lease may be taken over: a failure past its time; a build lease not
    renewed for a whole period as this instance has watched it (``unchanged`` seconds),
    or past its expiry by more than the clock slack by this instance's clock."""
    if record.state == "failed":
        return record.expires <= now
    if record.ttl <= 0:  # written without its period: the expiry is all there is
        return record.expires <= now
    return unchanged >= record.ttl or record.expires + max(record.ttl, CLOCK_SLACK) <= now


class WaitedTooLong(StorageError):
    """Another instance holds the build and it did not finish within the build deadline:
    a 503, since a later pull may find it done."""


class BuildLeases:
    """Leases on cache keys in ``storage``, held by this process."""

    def __init__(
        self,
        storage: IStorage,
        clock: IReactorTime,
        *,
        ttl: float = 60.0,
        failure_ttl: float = 60.0,
        wait_limit: float = 3600.0,
        holder: str | None = None,
    ) -> None:
        self._storage = storage
        self._clock = clock
        self.ttl = ttl
        self._failure_ttl = failure_ttl
        self._wait_limit = wait_limit
        self.holder = holder or holder_name()

    async def build_once(
        self,
        key: str,
        build: Callable[[], Awaitable[T]],
        finished: Callable[[], Awaitable[T | None]],
    ) -> T:
        """``build()`` here when this instance wins the lease on ``key``; otherwise
        what ``finished()`` gives once another instance has built it (None: not yet).
        A failure recorded by another instance is raised as its NixError."""
        lease_key = records.lease_key(key)
        started = self._clock.seconds()
        delay = FIRST_POLL
        first = True
        announced = False
        seen: tuple[Generation, float] | None = None  # a lease version, and when first seen here
        while True:
            found = await self._storage.read(lease_key)
            if found is None:
                if not first:
                    done = await finished()
                    if done is not None:
                        return done
                generation = await self._storage.write_if(
                    lease_key, self._record("building", self.ttl).encode(), JSON, ABSENT)
                if generation is not None:
                    return await self._hold(lease_key, generation, build)
                first = False
                continue  # another instance took it just now: read what it wrote
            data, generation = found
            record = LeaseRecord.decode(data)
            now = self._clock.seconds()
            if seen is None or seen[0] != generation:
                seen = (generation, now)
            if record is not None and record.expires > now and record.state == "failed":
                log.info("the build of {cache_key} failed on {holder}; not built again here",
                         cache_key=key, holder=record.holder)
                raise failure_error(record.failure or {})
            if record is None or _dead(record, now, unchanged=now - seen[1]) or (
                    record.state == "building" and gone_from_here(record.holder, self.holder)):
                taken = await self._storage.write_if(
                    lease_key, self._record("building", self.ttl).encode(), JSON, generation)
                if taken is not None:
                    if record is not None and record.state == "building":
                        log.warn("the lease of {holder} on {cache_key} expired; taking the build over",
                                 holder=record.holder, cache_key=key)
                    return await self._hold(lease_key, taken, build)
                continue
            if not announced:
                log.info("{holder} is building {cache_key}; waiting for it", holder=record.holder,
                         cache_key=key)
                announced = True
            first = False
            if now - started > self._wait_limit:
                raise WaitedTooLong(f"{record.holder} has been building this image for longer than "
                                    f"{self._wait_limit:.0f} seconds")
            await task.deferLater(self._clock, delay, lambda: None)
            delay = min(delay * 1.5, BRISK_POLL if now - started < BRISK_WAIT else LAST_POLL)
            done = await finished()
            if done is not None:
                return done

    def _record(self, state: str, ttl: float, failure: dict[str, Any] | None = None) -> LeaseRecord:
        return LeaseRecord(state, self.holder, self._clock.seconds() + ttl, failure,
                           ttl if state == "building" else 0.0)

    async def _hold(self, lease_key: str, generation: Generation,
                    build: Callable[[], Awaitable[T]]) -> T:
        """Run ``build`` holding the lease, renewed every third of its period; then
        remove it, or leave the failure in its place."""
        held = _Held(generation)
        renewing = task.LoopingCall(lambda: Deferred.fromCoroutine(self._renew(lease_key, held)))
        renewing.clock = self._clock
        renewal = renewing.start(self.ttl / 3, now=False)
        renewal.addErrback(lambda failure: log.failure("renewing a build lease failed", failure))

        async def stop_renewing() -> None:
            # The loop's Deferred fires once no renewal is in flight: the generation is final.
            if renewing.running:
                renewing.stop()
            await renewal

        try:
            result = await build()
        except Exception as e:
            await stop_renewing()
            # Names not in the package set are anyone's to make up: remembered by this
            # instance alone (``Images``), never written to storage for them.
            if isinstance(e, NixError) and not isinstance(e, PackagesNotFound) and self._failure_ttl > 0:
                record = self._record("failed", self._failure_ttl, failure_record(e))
                await self._quietly(self._storage.write_if(lease_key, record.encode(), JSON,
                                                           held.generation))
            else:
                await self._quietly(self._storage.delete(lease_key, held.generation))
            raise
        await stop_renewing()
        await self._quietly(self._storage.delete(lease_key, held.generation))
        return result

    async def _renew(self, lease_key: str, held: _Held) -> None:
        if held.lost:
            return
        try:
            renewed = await self._storage.write_if(
                lease_key, self._record("building", self.ttl).encode(), JSON, held.generation)
        except StorageError as e:
            log.warn("cannot renew the lease {key}: {error}", key=lease_key, error=str(e))
            return
        if renewed is None:
            held.lost = True
            log.warn("the lease {key} was taken over by another instance; this build goes on, "
                     "and whichever finishes first is served", key=lease_key)
            return
        held.generation = renewed

    async def _quietly(self, pending: Deferred[Any]) -> None:
        """Lease bookkeeping after a build: a storage failure here is logged, not raised
        (the lease then expires on its own)."""
        try:
            await pending
        except StorageError as e:
            log.warn("cannot update a build lease: {error}", error=str(e))


class _Held:
    """A lease this instance holds: its current generation, and whether it was lost."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.lost = False
