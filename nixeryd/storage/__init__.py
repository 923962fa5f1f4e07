"""Where blobs and cache records live: one interface, several backends.

The backends are imported from their own modules (``nixeryd.storage.filesystem``,
``gcs``, ``s3``) so that a backend's dependencies load only when it is used. Every key and
record's shape is in ``records``; the blob store (manifests by digest) in ``blobstore``.
"""
from __future__ import annotations

from nixeryd.storage.interface import (
    BlobLocation,
    InMemory,
    IStorage,
    LocalFile,
    Redirect,
    StorageError,
    check_hex,
    check_key,
)

__all__ = [
    "BlobLocation",
    "InMemory",
    "IStorage",
    "LocalFile",
    "Redirect",
    "StorageError",
    "check_hex",
    "check_key",
]
