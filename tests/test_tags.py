"""Tag records shared by instances on one storage."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.core.offload import inline
from nixeryd.registry.gc import collect
from nixeryd.registry.tags import MAX_TAGS, NEW_TAGS_PER_MINUTE, READ_CACHE_SECONDS, TagRecords
from nixeryd.storage.filesystem import FilesystemStorage
from nixeryd.storage.interface import Generation
from nixeryd.storage.records import TOUCH_INTERVAL, TagRecord, tag_key
from tests.memory import MemoryStorage


class SlowForAlpha(MemoryStorage):
    """A storage (a fake at the edge: a bucket slow for some writes) whose conditional writes
    of the repository ``alpha``'s record wait until the test lets each one go."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Deferred[None]] = []

    def write_if(self, key: str, data: bytes, content_type: str,
                 generation: Generation) -> Deferred[Generation | None]:
        if b'"alpha"' not in data:
            return super().write_if(key, data, content_type, generation)
        gate: Deferred[None] = Deferred()
        self.held.append(gate)
        written: Deferred[Generation | None] = gate.addCallback(
            lambda _: super(SlowForAlpha, self).write_if(key, data, content_type, generation))
        return written


class TagRecordTests(SynchronousTestCase):
    def test_instances_adding_tags_at_once_lose_none(self) -> None:
        """Eight instances on one directory, each in its own thread, each adding its own tag
        to one repository at the same moment: every tag is recorded."""
        root = Path(self.mktemp()).absolute()
        for round_ in range(10):
            name = f"repo{round_}"
            instances = [TagRecords(FilesystemStorage(str(root), inline), Clock()) for _ in range(8)]
            start = threading.Barrier(len(instances))
            outcomes: list[object] = []

            def add(records: TagRecords, tag: str, name: str, start: threading.Barrier,
                    outcomes: list[object]) -> None:
                start.wait()
                Deferred.fromCoroutine(records.add(name, tag)).addBoth(outcomes.append)

            threads = [threading.Thread(target=add, args=(records, f"t{i}", name, start, outcomes))
                       for i, records in enumerate(instances)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            self.assertEqual(outcomes, [None] * 8)
            fresh = TagRecords(FilesystemStorage(str(root), inline), Clock())
            listed = self.successResultOf(Deferred.fromCoroutine(fresh.tags(name)))
            self.assertEqual(listed, sorted(f"t{i}" for i in range(8)))

    def test_repositories_do_not_wait_on_each_other(self) -> None:
        """While one repository's record write is held up, another repository's tag is
        recorded at once; a second tag of the held repository waits for the first."""
        storage = SlowForAlpha()
        held = storage.held
        records = TagRecords(storage, Clock())
        alpha = Deferred.fromCoroutine(records.add("alpha", "v1"))
        beta = Deferred.fromCoroutine(records.add("beta", "v1"))
        self.assertNoResult(alpha)
        self.successResultOf(beta)
        again = Deferred.fromCoroutine(records.add("alpha", "v2"))
        self.assertEqual(len(held), 1)
        held[0].callback(None)
        self.successResultOf(alpha)
        self.assertEqual(len(held), 2)
        held[1].callback(None)
        self.successResultOf(again)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(records.tags("alpha"))), ["v1", "v2"])


class CountingReads(MemoryStorage):
    """A storage counting the records read by key (``get`` and ``read``)."""

    def __init__(self, now: Any) -> None:
        super().__init__(now=now)
        self.reads = 0

    def get(self, key: str) -> Deferred[bytes | None]:
        self.reads += 1
        return super().get(key)

    def read(self, key: str) -> Deferred[tuple[bytes, Generation] | None]:
        self.reads += 1
        return super().read(key)


class BoundedWritesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.storage = CountingReads(self.clock.seconds)
        self.records = TagRecords(self.storage, self.clock)

    def add(self, name: str, tag: str, records: TagRecords | None = None) -> None:
        self.successResultOf(Deferred.fromCoroutine((records or self.records).add(name, tag)))

    def stored(self, name: str) -> dict[str, float]:
        record = TagRecord.decode(self.successResultOf(self.storage.get(tag_key(name))))
        assert record is not None
        return record.served

    def generation(self, name: str) -> object:
        found = self.successResultOf(self.storage.read(tag_key(name)))
        return found[1] if found else None

    def test_new_tags_are_recorded_at_a_bounded_pace(self) -> None:
        """A thousand new tags in one second record NEW_TAGS_PER_MINUTE; the pace refills
        with time, and tags already recorded are served on without writing."""
        for i in range(1000):
            self.add("alpha", f"t{i}")
        self.assertEqual(len(self.stored("alpha")), NEW_TAGS_PER_MINUTE)
        written = self.generation("alpha")
        self.add("alpha", "t0")
        self.assertEqual(self.generation("alpha"), written)
        self.clock.advance(2)
        self.add("alpha", "late-a")
        self.add("alpha", "late-b")
        self.add("alpha", "late-c")
        self.assertIn("late-a", self.stored("alpha"))
        self.assertIn("late-b", self.stored("alpha"))
        self.assertNotIn("late-c", self.stored("alpha"))

    def test_a_record_keeps_the_most_recently_served_tags(self) -> None:
        """Past MAX_TAGS, the least recently served tag is dropped: the record stays small."""
        records = TagRecords(self.storage, self.clock, new_tags_per_minute=10_000)
        for i in range(MAX_TAGS + 20):
            self.add("alpha", f"t{i:03}", records)
            self.clock.advance(1)
        served = self.stored("alpha")
        self.assertEqual(sorted(served), [f"t{i:03}" for i in range(20, MAX_TAGS + 20)])

    def test_a_served_tag_is_refreshed_at_most_every_touch_interval(self) -> None:
        """Serving a recorded tag writes nothing within TOUCH_INTERVAL; after it, one write
        moves its served time, which gc keeps it by."""
        self.add("alpha", "v1")
        first = self.stored("alpha")["v1"]
        written = self.generation("alpha")
        self.clock.advance(TOUCH_INTERVAL - 1)
        self.add("alpha", "v1")
        self.assertEqual(self.generation("alpha"), written)
        self.clock.advance(2)
        self.add("alpha", "v1")
        self.assertEqual(self.stored("alpha")["v1"], first + TOUCH_INTERVAL + 1)

    def test_the_catalogue_reads_each_record_once(self) -> None:
        """A catalogue refresh lists the records and reads only those it has not read."""
        records = TagRecords(self.storage, self.clock, new_tags_per_minute=10_000)
        for i in range(50):
            self.add(f"repo{i}", "latest", records)
        reader = TagRecords(self.storage, self.clock)
        before = self.storage.reads
        self.assertEqual(len(self.successResultOf(Deferred.fromCoroutine(reader.names()))), 50)
        self.assertEqual(self.storage.reads - before, 50)
        self.add("repo50", "latest", records)
        self.clock.advance(READ_CACHE_SECONDS + 1)
        before = self.storage.reads
        self.assertEqual(len(self.successResultOf(Deferred.fromCoroutine(reader.names()))), 51)
        self.assertEqual(self.storage.reads - before, 1)

    def test_gc_drops_tags_not_served_within_its_window(self) -> None:
        """Tags not served within the window (and TOUCH_INTERVAL) go; a record left with no
        tag goes; a record of the old shape (a list) counts as served when written."""
        day = 86400.0
        records = TagRecords(self.storage, self.clock, new_tags_per_minute=10_000)
        self.add("alpha", "old", records)
        self.add("beta", "old", records)
        self.storage.put(tag_key("gamma"), json.dumps({"name": "gamma", "tags": ["v1"]}).encode(),
                         "application/json")
        self.clock.advance(5 * day)
        self.add("alpha", "new", records)
        self.clock.advance(1 * day)
        report = self.successResultOf(collect(self.storage, keep_seconds=2 * day, now=self.clock.seconds()))
        self.assertEqual((report.removed_tags, report.removed_tag_records), (3, 2))
        self.assertEqual(list(self.stored("alpha")), ["new"])
        for gone in ("beta", "gamma"):
            self.assertIsNone(self.successResultOf(self.storage.get(tag_key(gone))))
        fresh = TagRecords(self.storage, self.clock)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(fresh.names())), ["alpha"])
