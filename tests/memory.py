"""The memory backend: objects in dicts, for tests and throw-away instances.

Blobs are still written by the builder to a local file (``staging_path`` lies
in a private temporary directory); ``commit_blob`` reads that file into memory.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import time
import weakref
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from nixeryd.core.blobs import BlobInfo
from nixeryd.core.offload import Offload, inline
from nixeryd.storage.interface import (
    ABSENT,
    DAMAGED,
    INTACT,
    MISSING,
    BlobLocation,
    Generation,
    InMemory,
    IStorage,
    StorageError,
    StoredObject,
    blob_hex,
    check_hex,
    check_key,
    check_prefix,
    remove_quietly,
    storage_error,
)


@implementer(IStorage)
class MemoryStorage:
    """Every object held in memory; blobs are served from the bytes."""

    backend = "memory"
    checks_md5 = True

    def __init__(self, offload: Offload = inline, now: Callable[[], float] = time.time) -> None:
        self._offload = offload
        self._now = now
        self._modified: dict[str, float] = {}
        self._objects: dict[str, bytes] = {}
        self._content_types: dict[str, str] = {}
        self._generations: dict[str, int] = {}
        self._written = 0
        self._staging = tempfile.mkdtemp(prefix="nixeryd-staging-")
        weakref.finalize(self, shutil.rmtree, self._staging, True)

    # --- IStorage ----------------------------------------------------------------

    def staging_path(self) -> str:
        return os.path.join(self._staging, "blob-" + secrets.token_hex(16))

    def commit_blob(self, staged: str, info: BlobInfo) -> Deferred[None]:
        key = "layers/" + blob_hex(info)
        return Deferred.fromCoroutine(self._commit(staged, key, info))

    def discard(self, staged: str) -> None:
        remove_quietly(staged)

    def put(self, key: str, data: bytes, content_type: str) -> Deferred[None]:
        self._store(check_key(key), bytes(data), content_type)
        return succeed(None)

    def get(self, key: str) -> Deferred[bytes | None]:
        return succeed(self._objects.get(check_key(key)))

    def has(self, key: str) -> Deferred[bool]:
        return succeed(check_key(key) in self._objects)

    def check_blob(self, hexdigest: str, size: int, md5: str | None) -> Deferred[str]:
        return succeed(_state(self._objects.get("layers/" + check_hex(hexdigest)), size, md5))

    def hash_blob(self, hexdigest: str) -> Deferred[tuple[str, int] | None]:
        data = self._objects.get("layers/" + check_hex(hexdigest))
        return succeed(None if data is None else (hashlib.sha256(data).hexdigest(), len(data)))

    def locate_blob(self, hexdigest: str) -> Deferred[BlobLocation | None]:
        data = self._objects.get("layers/" + check_hex(hexdigest))
        return succeed(None if data is None else InMemory(data))

    def list(self, prefix: str) -> Deferred[list[StoredObject]]:
        start = check_prefix(prefix) + "/"
        return succeed([
            StoredObject(key, self._modified[key], len(data), self._generations[key])
            for key, data in self._objects.items() if key.startswith(start)
        ])

    def read(self, key: str) -> Deferred[tuple[bytes, Generation] | None]:
        data = self._objects.get(check_key(key))
        return succeed(None if data is None else (data, self._generations[key]))

    def write_if(self, key: str, data: bytes, content_type: str,
                 generation: Generation) -> Deferred[Generation | None]:
        current = self._generations.get(check_key(key), ABSENT)
        if current != generation:
            return succeed(None)
        self._store(key, bytes(data), content_type)
        return succeed(self._generations[key])

    def delete(self, key: str, generation: Generation | None = None) -> Deferred[None]:
        check_key(key)
        if generation is not None and self._generations.get(key) != generation:
            return succeed(None)
        for table in (self._objects, self._content_types, self._modified, self._generations):
            table.pop(key, None)
        return succeed(None)

    # --- helpers -----------------------------------------------------------------

    def _store(self, key: str, data: bytes, content_type: str) -> None:
        self._objects[key] = data
        self._content_types[key] = content_type
        self._modified[key] = self._now()
        self._written += 1
        self._generations[key] = self._written

    async def _commit(self, staged: str, key: str, info: BlobInfo) -> None:
        try:
            if _state(self._objects.get(key), info.size, info.md5) == INTACT:
                return
            try:
                data: bytes = await self._offload(_read, staged)
            except OSError as e:
                raise storage_error("committing blob " + info.digest, e) from e
            if len(data) != info.size:
                raise StorageError(
                    f"staged blob {info.digest} has {len(data)} bytes, expected {info.size}; not committed"
                )
            self._store(key, data, "application/octet-stream")
        finally:
            self.discard(staged)


def _state(data: bytes | None, size: int, md5: str | None) -> str:
    if data is None:
        return MISSING
    if len(data) != size or (md5 is not None and hashlib.md5(data).hexdigest() != md5):
        return DAMAGED
    return INTACT


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
