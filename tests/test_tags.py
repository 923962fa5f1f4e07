"""Tag records shared by instances on one storage."""
from __future__ import annotations

import threading
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.offload import inline
from nixeryd.storage.filesystem import FilesystemStorage
from nixeryd.storage.interface import Generation
from nixeryd.storage.memory import MemoryStorage
from nixeryd.tags import TagRecords


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
