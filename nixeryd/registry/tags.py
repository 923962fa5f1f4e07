"""Tags and repository names, kept in storage so that every instance sharing it answers
``tags/list`` and ``_catalog`` alike, and nothing is forgotten at a restart.

One record a repository, ``tags/<sha256 of its canonical name>``:
``{"name": ..., "served": {tag: seconds since the epoch}}``, the time each tag was last
served (refreshed at most every ``TOUCH_INTERVAL``, as image records are). Each write
names the version it read (``write_if``): two instances adding tags to one repository at
the same moment both land, the second reading the first's again.

What a request can make this write is bounded: a repository is recorded under its
canonical spelling (``names.canonical_name``), and only once its image was served, so a
record costs a build; a record holds at most ``MAX_TAGS`` tags, the least recently served
dropped first; and an instance records at most ``NEW_TAGS_PER_MINUTE`` tags it had not
seen, so a source that ignores tags (a channel, a path) cannot be made to write one record
update a request. Garbage collection drops tags not served within its window
(``sweep``), and the record with its last tag.
"""
from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from nixeryd.core.cache import TTLCache
from nixeryd.storage.interface import ABSENT, Generation, IStorage, StorageError, StoredObject
from nixeryd.storage.records import JSON, TAGS, TOUCH_INTERVAL, TagRecord, tag_key

log = Logger()

READ_CACHE_SECONDS = 10.0
MAX_TAGS = 100
"""Most tags one repository's record keeps, as the in-memory list of served names does."""
NEW_TAGS_PER_MINUTE = 60
"""Most tags an instance records in a minute that it had not recorded before."""
MAX_CONFIRMED = 100_000
WRITE_ATTEMPTS = 20


class _Budget:
    """At most ``per_minute`` takes in any minute, refilled continuously."""

    def __init__(self, clock: IReactorTime, per_minute: int) -> None:
        self._clock = clock
        self._rate = per_minute / 60.0
        self._capacity = float(per_minute)
        self._left = float(per_minute)
        self._at = clock.seconds()
        self.refused = 0

    def take(self) -> bool:
        now = self._clock.seconds()
        self._left = min(self._capacity, self._left + (now - self._at) * self._rate)
        self._at = now
        if self._left < 1.0:
            self.refused += 1
            return False
        self._left -= 1.0
        return True


class TagRecords:
    def __init__(self, storage: IStorage, clock: IReactorTime,
                 new_tags_per_minute: int = NEW_TAGS_PER_MINUTE) -> None:
        self._storage = storage
        self._clock = clock
        # One lock a repository: first pulls of different repositories never wait on each
        # other's record writes (one lock for all made a cold fleet queue on it).
        self._locks: dict[str, DeferredLock] = {}
        self._confirmed: OrderedDict[tuple[str, str], float] = OrderedDict()  # -> served time stored
        self._tags: TTLCache[list[str]] = TTLCache(clock, max_entries=10_000)
        self._names: TTLCache[list[str]] = TTLCache(clock, max_entries=1)
        # The name each listed record holds: a record's name never changes under its key,
        # so a catalogue refresh reads only records it has not seen.
        self._listed: dict[str, str] = {}
        self._budget = _Budget(clock, new_tags_per_minute)

    def recorded(self, name: str, tag: str) -> bool:
        """Whether this instance recorded ``name`` at ``tag`` within TOUCH_INTERVAL: then
        ``add`` has nothing to do."""
        confirmed = self._confirmed.get((name, tag))
        return confirmed is not None and self._clock.seconds() - confirmed < TOUCH_INTERVAL

    async def add(self, name: str, tag: str) -> None:
        """Remember that ``name`` (a canonical spelling) was served at ``tag``; storage
        failures are only logged."""
        if self.recorded(name, tag):
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
            now = self._clock.seconds()
            found = await self._storage.read(tag_key(name))
            record = TagRecord.decode(found[0]) if found is not None else None
            if record is None or record.name != name:
                record = TagRecord(name, {})  # absent, unreadable, or another name's: replaced
            stored = record.served.get(tag)
            if stored is not None and now - stored < TOUCH_INTERVAL:
                break
            if stored is None and not self._budget.take():
                if self._budget.refused == 1 or self._budget.refused % 1000 == 0:
                    log.warn("not recording tag {tag} of {image}: more than {rate} new tags a "
                             "minute ({refused} refused so far)", tag=tag, image=name,
                             rate=NEW_TAGS_PER_MINUTE, refused=self._budget.refused)
                return
            record = record.with_tag(tag, now, MAX_TAGS)
            written = await self._storage.write_if(tag_key(name), record.encode(), JSON,
                                                   ABSENT if found is None else found[1])
            if written is not None:
                self._tags.put(name, sorted(record.served), READ_CACHE_SECONDS)
                if stored is None:
                    self._names.pop("all")
                break
        else:
            log.warn("tag {tag} of {image} not recorded: the record kept changing", tag=tag, image=name)
            return
        self._confirmed[(name, tag)] = record.served.get(tag, now)
        self._confirmed.move_to_end((name, tag))
        while len(self._confirmed) > MAX_CONFIRMED:
            self._confirmed.popitem(last=False)

    async def tags(self, name: str) -> list[str]:
        cached = self._tags.get(name)
        if cached is None:
            record = TagRecord.decode(await self._storage.get(tag_key(name)))
            cached = sorted(record.served) if record is not None and record.name == name else []
            self._tags.put(name, cached, READ_CACHE_SECONDS)
        return sorted(cached)

    async def names(self) -> list[str]:
        """Every recorded repository: one listing, and a read of only the records this
        instance has not read before."""
        cached = self._names.get("all")
        if cached is None:
            listed = await self._storage.list(TAGS)
            known = {}
            for entry in listed:
                name = self._listed.get(entry.key)
                if name is None:
                    record = TagRecord.decode(await self._storage.get(entry.key))
                    if record is None or tag_key(record.name) != entry.key:
                        continue
                    name = record.name
                known[entry.key] = name
            self._listed = known
            cached = sorted(set(known.values()))
            self._names.put("all", cached, READ_CACHE_SECONDS)
        return cached


async def sweep(storage: IStorage, served_horizon: float, dry_run: bool) -> tuple[int, int]:
    """Drop the tags not served since ``served_horizon``, and the records left with none:
    how many tags and records went. A record written since it was read is left for the
    next collection."""
    dropped_tags = removed_records = 0
    for entry in await storage.list(TAGS):
        found = await storage.read(entry.key)
        if found is None:
            continue
        record = TagRecord.decode(found[0], entry.modified)
        if record is None:
            removed_records += 1
            await _drop(storage, entry, found[1], None, dry_run)
            continue
        kept = {tag: at for tag, at in record.served.items() if at >= served_horizon}
        if len(kept) == len(record.served):
            continue
        dropped_tags += len(record.served) - len(kept)
        if not kept:
            removed_records += 1
        await _drop(storage, entry, found[1], TagRecord(record.name, kept) if kept else None, dry_run)
    return dropped_tags, removed_records


async def _drop(storage: IStorage, entry: StoredObject, generation: Generation, keep: TagRecord | None,
                dry_run: bool) -> None:
    if dry_run:
        return
    if keep is None:
        await storage.delete(entry.key, generation)
    else:
        await storage.write_if(entry.key, keep.encode(), JSON, generation)
