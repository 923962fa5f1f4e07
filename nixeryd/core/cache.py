"""Single-flight work and the in-memory manifest cache.

Pure of the reactor: time comes from an injected ``IReactorTime``.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, TypeVar

from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

T = TypeVar("T")
V = TypeVar("V")


def when_done(shared: Deferred[T]) -> Deferred[None]:
    """A Deferred of the caller's own that fires (with None) when ``shared`` does, leaving
    ``shared``'s result to the rest of its chain."""
    done: Deferred[None] = Deferred()

    def notify(result: T | Failure) -> T | Failure:
        done.callback(None)
        return result

    shared.addBoth(notify)
    return done


class SingleFlight(Generic[T]):
    """Runs one piece of work per key at a time; every caller asking for a key
    while its work runs gets its own Deferred for the same result.

    Cancelling a caller's Deferred never cancels the shared work: a client that
    goes away does not stop a build that others wait for.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, list[Deferred[T]]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def run(self, key: str, work: Callable[[], Awaitable[T]]) -> Deferred[T]:
        mine: Deferred[T] = Deferred(lambda d: self._forget(key, d))
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._waiting[key] = [mine]

        async def call() -> T:
            return await work()

        Deferred.fromCoroutine(call()).addBoth(self._settle, key)
        return mine

    def _forget(self, key: str, d: Deferred[T]) -> None:
        waiters = self._waiting.get(key)
        if waiters is not None and d in waiters:
            waiters.remove(d)

    def _settle(self, result: T | Failure, key: str) -> None:
        waiters = self._waiting.pop(key, [])
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        if isinstance(result, Failure) and not waiters:
            # Everyone who asked went away: the failure would end here unseen.
            log.failure("work for {cache_key} failed with nobody waiting for it", result, cache_key=key)


@dataclass(frozen=True)
class _Entry(Generic[V]):
    value: V
    expires: float | None  # None: kept for good


class TTLCache(Generic[V]):
    """Cache key -> value (an image's manifests, a layer's blob), each with an optional
    time to live; bounded, least recently used out first."""

    def __init__(self, clock: IReactorTime, max_entries: int = 4096) -> None:
        self._clock = clock
        self._max = max_entries
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires is not None and entry.expires <= self._clock.seconds():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.value

    def pop(self, key: str) -> None:
        """Forget ``key``, if it is there."""
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def put(self, key: str, value: V, ttl: float | None) -> None:
        expires = None if ttl is None else self._clock.seconds() + ttl
        self._entries[key] = _Entry(value, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)


async def gather(deferreds: list[Deferred[T]]) -> list[T]:
    """Every result, in order; the first failure is raised as itself (not wrapped in FirstError)."""
    try:
        results: list[T] = await gatherResults(deferreds, consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()
        raise  # unreachable: raiseException always raises
    return results
