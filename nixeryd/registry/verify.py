"""``nixeryd verify``: re-hash every stored blob and check every record against them.

- ``layers/<hex>``: the bytes must hash to their name.
- ``builds/<key>``: a layer record must be readable and name a blob that is there, sound,
  and of the recorded size.
- ``manifests/<key>``: an image record must be readable and name manifests that are there
  and sound.

With ``repair``, what is damaged is removed: a damaged blob, and every record naming a
blob that is damaged or gone. Nothing sound is touched, and the next pull of an affected
image packs what it needs again. Safe while instances serve: they check what they reuse.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet.defer import DeferredSemaphore
from twisted.logger import Logger

from nixeryd.core.cache import gather
from nixeryd.storage import records
from nixeryd.storage.interface import IStorage
from nixeryd.storage.records import ImageRecord

log = Logger()

CONCURRENT_READS = 4


@dataclass
class VerifyReport:
    """What a verification found and, with repair, removed."""

    blobs: int = 0
    records: int = 0
    damaged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"blobs": self.blobs, "records": self.records, "damaged": self.damaged,
                "removed": self.removed}


Progress = Callable[[str, int, int], None]
"""Told (what, done, total) as work advances."""


def _quiet(what: str, done: int, total: int) -> None:
    pass


async def verify(storage: IStorage, *, repair: bool = False, progress: Progress = _quiet) -> VerifyReport:
    report = VerifyReport()

    async def damaged(key: str, why: str) -> None:
        log.warn("damaged: {key}: {why}", key=key, why=why)
        report.damaged.append(key)
        if repair:
            await storage.delete(key)
            report.removed.append(key)
            log.warn("removed {key}", key=key)

    blobs = await storage.list(records.BLOBS)
    sizes: dict[str, int] = {}  # hex -> size, for the blobs that are sound
    slots = DeferredSemaphore(CONCURRENT_READS)
    done = 0

    async def check(key: str) -> None:
        nonlocal done
        hexdigest = records.hex_of_key(key)
        found = await storage.hash_blob(hexdigest)
        done += 1
        progress("blobs", done, len(blobs))
        if found is None:
            return  # removed meanwhile (gc): nothing to say
        actual, size = found
        if actual != hexdigest:
            await damaged(key, f"its bytes hash to sha256:{actual}")
        else:
            sizes[hexdigest] = size

    progress("blobs", 0, len(blobs))
    await gather([slots.run(check, blob.key) for blob in blobs])
    report.blobs = len(blobs)

    stored = await storage.list(records.LAYERS) + await storage.list(records.IMAGES)
    for index, record in enumerate(stored, 1):
        progress("records", index, len(stored))
        data = await storage.get(record.key)
        if data is None:
            continue
        why = _record_problem(record.key, data, sizes)
        if why is not None:
            await damaged(record.key, why)
    report.records = len(stored)
    return report


def _record_problem(key: str, data: bytes, sizes: dict[str, int]) -> str | None:
    """What is wrong with a record, or None when it is sound."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        return f"unreadable record ({e})"
    if key.startswith(records.LAYERS + "/"):
        hexdigest, size = records.layer_record_blob(data)
        if hexdigest is None:
            return "the record names no blob"
        if hexdigest not in sizes:
            return f"its blob sha256:{hexdigest} is missing or damaged"
        if size != sizes[hexdigest]:
            return f"its blob has {sizes[hexdigest]} bytes, the record says {size}"
        return None
    image = ImageRecord.decode(data)
    if image is None:
        return "unreadable record (not an image record)"
    for digest, hexdigest in zip([image.oci, image.docker], image.manifests(), strict=False):
        if hexdigest is None:
            return f"the record names no manifest ({digest!r})"
        if hexdigest not in sizes:
            return f"its manifest {digest} is missing or damaged"
    return None
