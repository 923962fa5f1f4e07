"""What every storage backend offers, and where a blob can be served from.

The object layout, shared by all backends so that one bucket can serve many
instances, and every record's shape are in ``nixeryd.storage.records``; blobs being
written are under ``staging/``, never served.

Keys are checked by the storage itself (``check_key``): only those prefixes
followed by exactly 64 lowercase hex characters are accepted, so no key
can ever name anything outside the store. A malformed key is a programming
error: every method raises ``ValueError`` for it at once, before any I/O, rather
than returning a failed Deferred. Failures of the backend itself are
``StorageError``, delivered through the returned Deferred.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Union

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from nixeryd.core.blobs import BlobInfo
from nixeryd.storage.records import PREFIXES

log = Logger()

_KEY = re.compile("(?:" + "|".join(PREFIXES) + r")/[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]{64}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class LocalFile:
    """Serve the blob from this file on the local disk (Range-capable)."""

    path: str
    size: int


@dataclass(frozen=True)
class InMemory:
    """Serve these bytes."""

    data: bytes


@dataclass(frozen=True)
class Redirect:
    """Answer with a 307 to this URL; ``size`` is the object's, when the lookup gave it."""

    url: str
    size: int | None = None


BlobLocation = Union[LocalFile, InMemory, Redirect]

Generation = Union[int, str]
"""Which version of an object: GCS's generation number, S3's ETag, a file's identity.
Opaque to callers, who only hand back what ``read`` or ``list`` gave them."""

ABSENT: Generation = 0
"""The generation ``write_if`` takes to mean "only if there is no object yet"."""

INTACT = "intact"
MISSING = "missing"
DAMAGED = "damaged"
"""What ``check_blob`` finds: the blob as recorded, no blob, or one that differs."""


@dataclass(frozen=True)
class StoredObject:
    """An object as listed: its key, when it was last written, its size."""

    key: str
    modified: float  # seconds since the epoch
    size: int
    generation: Generation | None = None  # the object's version, where the backend has one


class StorageError(Exception):
    """The backend failed (disk full, I/O error, unreachable service): the API answers 503."""


def check_key(key: str) -> str:
    """``key`` itself when it is a valid object key; ``ValueError`` otherwise."""
    if not isinstance(key, str) or _KEY.fullmatch(key) is None:
        raise ValueError(
            "invalid storage key {!r}: expected one of {} followed by '/' and 64 lowercase hex "
            "characters".format(key, ", ".join(PREFIXES))
        )
    return key


def check_prefix(prefix: str) -> str:
    """``prefix`` itself when it is one of the listable prefixes; ``ValueError`` otherwise."""
    if prefix not in PREFIXES:
        raise ValueError("invalid prefix {!r}: expected one of {}".format(prefix, ", ".join(PREFIXES)))
    return prefix


def check_hex(hexdigest: str) -> str:
    """``hexdigest`` itself when it is 64 lowercase hex characters; ``ValueError`` otherwise."""
    if not isinstance(hexdigest, str) or _HEX.fullmatch(hexdigest) is None:
        raise ValueError(f"invalid blob digest {hexdigest!r}: expected 64 lowercase hex characters")
    return hexdigest


def blob_hex(info: BlobInfo) -> str:
    """The hex part of ``info.digest``, which must be ``sha256:<64 hex>``."""
    if not isinstance(info.digest, str) or _DIGEST.fullmatch(info.digest) is None:
        raise ValueError(f"invalid blob digest {info.digest!r}: expected sha256:<64 hex>")
    return info.digest[len("sha256:"):]


def remove_quietly(path: str) -> None:
    """Remove a local file; a missing one is fine and another failure is only logged,
    so that it never hides the error that led to the removal."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("could not remove {path}: {error}", path=path, error=str(e))


def storage_error(action: str, error: OSError) -> StorageError:
    """A ``StorageError`` for an ``OSError`` met while doing ``action``, saying what went wrong."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full"
    elif error.errno == errno.EROFS:
        reason = "the file system is read-only"
    elif error.errno in (errno.EACCES, errno.EPERM):
        reason = "permission denied"
    else:
        reason = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename else ""
    return StorageError(f"{action} failed: {reason}{where}")


def staging_failure(action: str, error: OSError, staged: str) -> StorageError | None:
    """For an ``OSError`` met while writing ``staged``: the ``StorageError`` it is when it
    concerns the staged file (a full disk, say), or None when it names another file (a
    store path that cannot be read: a packing failure, not storage's)."""
    if error.filename is not None and os.path.abspath(error.filename) != os.path.abspath(staged):
        return None
    return storage_error(action, error)


class IStorage(Interface):
    """A store of blobs and small objects under validated keys."""

    backend = Attribute("""The backend's name: "filesystem", "gcs", "s3".""")
    checks_md5 = Attribute(
        """Whether blobs are committed and checked with their MD5 (buckets do). Where not,
        layers are packed without one (a twentieth of gzip packing's CPU, a tenth of zstd's)."""
    )

    def staging_path() -> str:
        """A fresh local file path where a new blob may be written.

        For the filesystem backend it lies on the same file system as the store,
        so that committing is a rename; other backends use a private temporary
        directory. Nothing is created: the caller writes the file.
        """

    def commit_blob(staged: str, info: BlobInfo) -> Deferred[None]:
        """Make the staged file the blob ``layers/<hex of info.digest>``.

        The staged file is gone afterwards, whatever the outcome. Idempotent:
        when the blob already exists the staged file is just discarded. The
        size is checked against ``info.size`` (``StorageError`` on a mismatch);
        a partial file is never left under ``layers/``.
        """

    def discard(staged: str) -> None:
        """Remove a staged file that will not be committed; a missing file is fine."""

    def put(key: str, data: bytes, content_type: str) -> Deferred[None]:
        """Atomically write a small object under ``key``, replacing any previous one."""

    def get(key: str) -> Deferred[bytes | None]:
        """The object's bytes, or None when there is none."""

    def has(key: str) -> Deferred[bool]:
        """Whether an object exists under ``key``."""

    def check_blob(hexdigest: str, size: int, md5: str | None) -> Deferred[str]:
        """Whether ``layers/<hexdigest>`` is as its record says, without reading it:
        ``INTACT`` when its size (and, where the backend keeps one, its MD5, given as
        hex) match, ``DAMAGED`` when it is there but does not, ``MISSING`` when it is
        not. One metadata lookup at most. Commits replace a damaged blob."""

    def hash_blob(hexdigest: str) -> Deferred[tuple[str, int] | None]:
        """The sha256 (hex) and size of the bytes stored as ``layers/<hexdigest>``, read
        whole in constant memory (for ``nixeryd verify``), or None when it is absent."""

    def locate_blob(hexdigest: str) -> Deferred[BlobLocation | None]:
        """Where ``layers/<hexdigest>`` can be served from, or None when it is absent."""

    def list(prefix: str) -> Deferred[list[StoredObject]]:
        """Every object under ``prefix`` (one of ``PREFIXES``); staging is never listed."""

    def read(key: str) -> Deferred[tuple[bytes, Generation] | None]:
        """The object's bytes and its generation, or None when there is none."""

    def write_if(key: str, data: bytes, content_type: str, generation: Generation) -> Deferred[Generation | None]:
        """Write ``key`` only when its current generation is ``generation`` (``ABSENT``:
        only when there is no object), atomically with that check, across every instance
        on the same storage. The new generation, or None when the precondition failed
        (nothing written)."""

    def delete(key: str, generation: Generation | None = None) -> Deferred[None]:
        """Remove the object under ``key``; an absent one is fine. With ``generation``
        (from a listing), only that version: one written since is kept."""
