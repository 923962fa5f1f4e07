"""Where blobs and cache records live: one interface, several backends.

The backends are imported from their own modules (``nixeryd.storage.filesystem``,
``tests.memory``) so that a backend's dependencies load only when it
is used.
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
