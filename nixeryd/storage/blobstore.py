"""Manifests and small blobs by digest: stored whole, read back checked against their digest.

The builder stores the manifests, configs and SBOMs it makes here; the registry reads
manifests back (``stored_manifest``) and checks that everything an image names is still in
storage (``intact``) before serving an image it did not build itself.
"""
from __future__ import annotations

import hashlib
import json

from twisted.logger import Logger

from nixeryd.core.blobs import BlobInfo, blob_info
from nixeryd.core.offload import Offload
from nixeryd.image import manifest
from nixeryd.image.manifest import StoredManifest
from nixeryd.image.names import DigestInvalid, parse_digest
from nixeryd.storage import records
from nixeryd.storage.interface import INTACT, InMemory, IStorage, LocalFile

log = Logger()

INLINE_HASH = 64 * 1024
"""Bodies up to this size are hashed on the calling thread (microseconds); bigger ones in a thread."""


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """Whole blobs in ``storage``, hashed through ``offload``."""

    def __init__(self, storage: IStorage, offload: Offload) -> None:
        self._storage = storage
        self._offload = offload

    async def stored_manifest(self, digest: str) -> StoredManifest | None:
        """A manifest or index stored under ``digest``, or None."""
        location = await self._storage.locate_blob(digest.removeprefix("sha256:"))
        if location is None:
            return None
        if isinstance(location, LocalFile) and location.size > manifest.MAX_MANIFEST_SIZE:
            return None
        if isinstance(location, InMemory):
            body: bytes | None = location.data
        else:
            body = await self._storage.get(records.blob_key(digest))
        if body is None or len(body) > manifest.MAX_MANIFEST_SIZE:
            return None
        # A manifest is a few KB, hashed in microseconds; a big one is hashed in a thread.
        if len(body) <= INLINE_HASH:
            actual = hashlib.sha256(body).hexdigest()
        else:
            actual = await self._offload(_sha256_hex, body)
        if "sha256:" + actual != digest:
            log.warn("stored manifest {digest} does not match its digest: ignored", digest=digest)
            return None
        try:
            media_type = manifest.manifest_media_type(body)
        except ValueError:
            return None
        return StoredManifest(digest=digest, media_type=media_type, body=body)

    async def intact(self, stored: StoredManifest) -> bool:
        """Whether every blob ``stored`` names (config, layers; for an index, each listed
        manifest and its blobs) is in storage at the size the manifest gives."""
        try:
            doc = json.loads(stored.body)
            children = [str(entry["digest"]) for entry in doc.get("manifests", ())]
            blobs = [(str(d["digest"]), int(d["size"])) for d in
                     ([doc["config"], *doc["layers"]] if "config" in doc else [])]
        except (ValueError, KeyError, TypeError):
            return False
        for digest in children:
            child = await self.stored_manifest(digest)
            if child is None or not await self.intact(child):
                return False
        for digest, size in blobs:
            try:
                parse_digest(digest)
            except DigestInvalid:
                return False
            state = await self._storage.check_blob(digest.removeprefix("sha256:"), size, None)
            if state != INTACT:
                log.warn("{digest} of manifest {manifest} is {state}; the image is built again",
                         digest=digest, manifest=stored.digest, state=state)
                return False
        return True

    async def store_manifest(self, body: bytes, media_type: str) -> StoredManifest:
        """Store a manifest or index as a blob, so that it is served by digest."""
        info = await self.put_blob(body)
        return StoredManifest(digest=info.digest, media_type=media_type, body=body)

    async def put_blob(self, data: bytes) -> BlobInfo:
        info: BlobInfo = await self._offload(blob_info, data)
        await self._storage.put(records.blob_key(info.digest), data, "application/octet-stream")
        return info
