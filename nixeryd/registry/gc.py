"""Garbage collection of storage: remove the blobs no kept image needs.

An image is kept while its cache record (``manifests/<key>``) says it was built
or served within the keep window; instances refresh the served time of the
images they serve at most every ``TOUCH_INTERVAL``, so a record may be that much
behind, and gc keeps what it says was served within the window and that interval:
nothing served within the window is collected, whatever the window. Everything a kept image's manifests
and indexes reach is kept, and so is every blob written within the window,
whatever refers to it, so that builds in progress lose nothing. Safe while
instances serve: one that needs a removed blob again packs it anew. A
failure record is removed once its time is over; a build lease once it has been expired
for a day (its holder died and nobody asked for the image since). Tags not served
within the window are dropped from their repository's record, and a record left with
none is removed, and so is what a name resolved to when it was not recorded within the
window.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from twisted.logger import Logger

from nixeryd.core.blobs import hex_of
from nixeryd.registry import tags
from nixeryd.storage import records
from nixeryd.storage.interface import IStorage, StoredObject
from nixeryd.storage.records import TOUCH_INTERVAL, ImageRecord, LeaseRecord

log = Logger()

STALE_LEASE = 86400.0
"""Seconds after its expiry that a build lease is garbage."""


@dataclass
class Report:
    """What a collection kept and removed."""

    kept_images: int = 0
    removed_images: int = 0
    kept_blobs: int = 0
    removed_blobs: int = 0
    removed_bytes: int = 0
    removed_records: int = 0
    removed_leases: int = 0
    removed_tags: int = 0
    removed_tag_records: int = 0
    removed_resolutions: int = 0
    removed: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, int]:
        return {
            "kept_images": self.kept_images,
            "removed_images": self.removed_images,
            "kept_blobs": self.kept_blobs,
            "removed_blobs": self.removed_blobs,
            "removed_bytes": self.removed_bytes,
            "removed_layer_records": self.removed_records,
            "removed_leases": self.removed_leases,
            "removed_tags": self.removed_tags,
            "removed_tag_records": self.removed_tag_records,
            "removed_resolutions": self.removed_resolutions,
        }


async def collect(storage: IStorage, *, keep_seconds: float, now: float, dry_run: bool = False) -> Report:
    """Remove what nothing kept needs; with ``dry_run`` only report it."""
    report = Report()
    horizon = now - keep_seconds
    served_horizon = horizon - TOUCH_INTERVAL
    roots: list[str] = []
    for record in await storage.list(records.IMAGES):
        image = ImageRecord.decode(await storage.get(record.key))
        last = image.last_used if image is not None else record.modified
        if last >= served_horizon or record.modified >= served_horizon:
            report.kept_images += 1
            roots.extend(image.roots() if image is not None else [])
        else:
            report.removed_images += 1
            await _remove(storage, record, report, dry_run, "image record")

    needed = await _reachable(storage, roots)
    survivors: set[str] = set()
    for blob in await storage.list(records.BLOBS):
        hexdigest = records.hex_of_key(blob.key)
        if hexdigest in needed or blob.modified >= horizon:
            report.kept_blobs += 1
            survivors.add(hexdigest)
            continue
        report.removed_blobs += 1
        report.removed_bytes += blob.size
        await _remove(storage, blob, report, dry_run, "blob")

    for record in await storage.list(records.LAYERS):
        if record.modified >= horizon:
            continue
        target, _ = records.layer_record_blob(await storage.get(record.key))
        if target not in survivors:
            report.removed_records += 1
            await _remove(storage, record, report, dry_run, "layer record")
    for lease in await storage.list(records.LEASES):
        found = await storage.read(lease.key)
        if found is None:
            continue
        lease_record = LeaseRecord.decode(found[0])
        over = lease_record is not None and lease_record.state == "failed" and lease_record.expires < now
        if over or (lease.modified < now - STALE_LEASE
                    and (lease_record is None or lease_record.expires < now - STALE_LEASE)):
            report.removed_leases += 1
            # Only the version read: a lease taken since is kept.
            await _remove(storage, dataclasses.replace(lease, generation=found[1]), report, dry_run, "lease")
    report.removed_tags, report.removed_tag_records = await tags.sweep(storage, served_horizon, dry_run)
    for resolution in await storage.list(records.RESOLVED):
        # What a name resolved to is a cache of Nix's answer: one not written within the
        # window goes (Nix answers again when the name is next asked for).
        if resolution.modified < horizon:
            report.removed_resolutions += 1
            await _remove(storage, resolution, report, dry_run, "resolution")
    log.info(
        "{verb} {blobs} blobs ({size} bytes) and {images} image records; kept {kept} images",
        verb="would remove" if dry_run else "removed",
        blobs=report.removed_blobs, size=report.removed_bytes,
        images=report.removed_images, kept=report.kept_images,
    )
    return report


async def _reachable(storage: IStorage, roots: list[str]) -> set[str]:
    """Every blob the manifests and indexes in ``roots`` lead to, themselves included."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        hexdigest = todo.pop()
        if hexdigest in seen:
            continue
        seen.add(hexdigest)
        body = await storage.get(records.blob_key(hexdigest))
        try:
            doc = json.loads(body or b"")
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(doc, dict):
            continue
        # Configs and layers are only marked; index entries are manifests to read in turn.
        for child in [doc.get("config"), *(doc.get("layers") or [])]:
            found = hex_of(child.get("digest")) if isinstance(child, dict) else None
            if found is not None:
                seen.add(found)
        for child in doc.get("manifests") or []:
            found = hex_of(child.get("digest")) if isinstance(child, dict) else None
            if found is not None:
                todo.append(found)
    return seen


async def _remove(storage: IStorage, listed: StoredObject, report: Report, dry_run: bool, what: str) -> None:
    """Remove an object as it was listed: one written again since (a blob packed anew by
    an instance that needed it) is kept."""
    report.removed.append(listed.key)
    if not dry_run:
        await storage.delete(listed.key, listed.generation)
