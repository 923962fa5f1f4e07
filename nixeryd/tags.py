"""Tags and repository names, kept in storage so that every instance sharing it answers
``tags/list`` and ``_catalog`` alike, and nothing is forgotten at a restart.

One record a repository, ``tags/<sha256 of its name>``: ``{"name": ..., "tags": [...]}``,
written when an instance serves a tag it has not seen stored, and read through a short
cache. Each write names the version it read (``write_if``): two instances adding tags to
one repository at the same moment both land, the second reading the first's again.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from nixeryd.cache import TTLCache
from nixeryd.storage.interface import ABSENT, IStorage, StorageError

log = Logger()

READ_CACHE_SECONDS = 10.0
MAX_TAGS = 1000
MAX_CONFIRMED = 100_000
WRITE_ATTEMPTS = 20


def record_key(name: str) -> str:
    return "tags/" + hashlib.sha256(name.encode()).hexdigest()


class TagRecords:
    def __init__(self, storage: IStorage, clock: IReactorTime) -> None:
        self._storage = storage
        # One lock a repository: first pulls of different repositories never wait on each
        # other's record writes (one lock for all made a cold fleet queue on it).
        self._locks: dict[str, DeferredLock] = {}
        self._confirmed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._tags: TTLCache[list[str]] = TTLCache(clock, max_entries=10_000)
        self._names: TTLCache[list[str]] = TTLCache(clock, max_entries=1)

    async def add(self, name: str, tag: str) -> None:
        """Remember that ``name`` was served at ``tag``; storage failures are only logged."""
        if (name, tag) in self._confirmed:
            return
        lock = self._locks.setdefault(name, DeferredLock())
        try:
            await lock.run(self._add, name, tag)
        except StorageError as e:
            log.warn("cannot record tag {tag} of {image}: {error}", tag=tag, image=name, error=str(e))
        finally:
            if not lock.locked and not lock.waiting and self._locks.get(name) is lock:
                del self._locks[name]

    async def _add(self, name: str, tag: str) -> None:
        for _ in range(WRITE_ATTEMPTS):
            found = await self._storage.read(record_key(name))
            tags = _tags_of(name, found[0] if found is not None else None)
            if tag in tags:
                break
            tags = (tags + [tag])[-MAX_TAGS:]
            body = json.dumps({"name": name, "tags": tags}).encode()
            written = await self._storage.write_if(record_key(name), body, "application/json",
                                                   ABSENT if found is None else found[1])
            if written is not None:
                self._tags.put(name, tags, READ_CACHE_SECONDS)
                self._names.pop("all")
                break
        else:
            log.warn("tag {tag} of {image} not recorded: the record kept changing", tag=tag, image=name)
            return
        self._confirmed[(name, tag)] = None
        while len(self._confirmed) > MAX_CONFIRMED:
            self._confirmed.popitem(last=False)

    async def tags(self, name: str) -> list[str]:
        cached = self._tags.get(name)
        if cached is None:
            cached = await self._read(name)
            self._tags.put(name, cached, READ_CACHE_SECONDS)
        return sorted(cached)

    async def names(self) -> list[str]:
        cached = self._names.get("all")
        if cached is None:
            found = []
            for listed in await self._storage.list("tags"):
                doc = _parse(await self._storage.get(listed.key))
                if doc is not None:
                    found.append(doc[0])
            cached = sorted(set(found))
            self._names.put("all", cached, READ_CACHE_SECONDS)
        return cached

    async def _read(self, name: str) -> list[str]:
        return _tags_of(name, await self._storage.get(record_key(name)))


def _tags_of(name: str, data: bytes | None) -> list[str]:
    """The tags a stored record gives ``name``; none when it is absent, unreadable, or
    another name's (a hash collision)."""
    doc = _parse(data)
    return list(doc[1]) if doc is not None and doc[0] == name else []


def _parse(data: bytes | None) -> tuple[str, list[str]] | None:
    try:
        doc = json.loads(data or b"")
        name, tags = doc["name"], doc["tags"]
        if isinstance(name, str) and isinstance(tags, list) and all(isinstance(t, str) for t in tags):
            return name, tags
    except (ValueError, KeyError, TypeError):
        pass
    return None
