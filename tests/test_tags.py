"""Tag records shared by instances on one storage."""
from __future__ import annotations

import threading
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.offload import inline
from nixeryd.storage.filesystem import FilesystemStorage
from nixeryd.tags import TagRecords


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
