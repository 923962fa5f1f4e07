"""What the bucket backends (GCS, S3) share: blocking client calls in a thread pool,
each within a deadline and behind a circuit breaker, a local staging directory for
blobs on their way up, and the blobs known to be in the bucket."""
from __future__ import annotations

import base64
import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure

from nixeryd.core.blobs import BlobInfo
from nixeryd.core.cache import TTLCache
from nixeryd.core.offload import Offload
from nixeryd.storage.breaker import CircuitBreaker
from nixeryd.storage.interface import (
    DAMAGED,
    INTACT,
    BlobLocation,
    Redirect,
    StorageError,
    blob_hex,
    check_hex,
    check_key,
    remove_quietly,
)
from nixeryd.storage.records import blob_key
from nixeryd.storage.staging import remove_leftovers, staging_name

log = Logger()

T = TypeVar("T")

KNOWN_FOR = 60.0
"""Seconds a blob found in the bucket is served without looking it up again."""

BLOB_TYPE = "application/octet-stream"
MIN_TRANSFER_RATE = 10 * 1024 * 1024
"""Bytes a second a transfer is allowed at the least, beyond the deadline every call has."""


def md5_base64(hex_md5: str) -> str:
    """GCS's MD5 and S3's Content-MD5: base64 of the raw digest."""
    return base64.b64encode(bytes.fromhex(hex_md5)).decode("ascii")


@dataclass(frozen=True)
class Found:
    """An object as a metadata lookup describes it."""

    size: int | None


class HashingSink:
    """A file-like object that hashes what is written to it and keeps nothing."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def check_staged(staged: str, info: BlobInfo) -> str:
    """Blocking: the staged file has the size its blob was written with, or nothing is
    committed from it. Its MD5 in hex: the one it was written with, else read from it."""
    size = os.path.getsize(staged)
    if size != info.size:
        raise StorageError(f"staged blob {info.digest} has {size} bytes, expected {info.size}; not committed")
    if info.md5 is not None:
        return info.md5
    with open(staged, "rb") as f:
        return hashlib.file_digest(f, "md5").hexdigest()


class RemoteStorage:
    """The shared half of a bucket backend; subclasses name their ``backend`` and the
    client's exceptions (``failures``), which become ``StorageError``, and make the blocking
    calls below: ``_lookup``, ``_check``, ``_commit`` and ``_url`` (which makes a redirect
    URL; when ``url_blocks``, in a thread and reused for ``url_lifetime`` seconds)."""

    backend = "remote"
    checks_md5 = True

    def __init__(
        self,
        offload: Offload,
        *,
        failures: tuple[type[BaseException], ...],
        staging_dir: str,
        known_blobs: int,
        deadline: float,
        cooldown: float,
        clock: IReactorTime | None,
        url_blocks: bool,
        url_lifetime: float,
    ) -> None:
        # Without a clock (unit tests calling inline) deadlines never fire.
        self._clock = clock if clock is not None else Clock()
        self.breaker = CircuitBreaker(self._clock, cooldown=cooldown, name="the bucket")
        self._offload = offload
        self._failures = failures
        self._deadline = deadline
        self._staging = staging_dir
        os.makedirs(staging_dir, exist_ok=True)
        # Uploads a kill -9 cut short leave their local copies: a dead process's go now.
        remove_leftovers(staging_dir)
        # Blobs known to be in the bucket (written or looked up here), and when: served
        # without another lookup for KNOWN_FOR seconds, then looked up again, so that a
        # blob removed (verify --repair, gc, a hand) stops being redirected to within a
        # minute. Touched only on the reactor thread.
        self._known: OrderedDict[str, float] = OrderedDict()
        self._known_max = known_blobs
        # A redirect that blocks (a signature from IAM signBlob, a presigned URL whose
        # credentials may need refreshing) is made in a thread and reused, so that warm
        # pulls cost no call at all.
        self._url_blocks = url_blocks
        self._url_lifetime = url_lifetime
        self._urls: TTLCache[str] = TTLCache(self._clock, max_entries=100_000)

    # --- the IStorage methods both bucket backends make the same way ---------------

    def staging_path(self) -> str:
        return staging_name(self._staging, "blob")

    def discard(self, staged: str) -> None:
        remove_quietly(staged)

    def commit_blob(self, staged: str, info: BlobInfo) -> Deferred[None]:
        key = blob_key(blob_hex(info))
        d = self._call("committing blob " + info.digest, self._commit, staged, key, info, size=info.size)
        return d.addCallback(lambda _: self._remember(key))

    def has(self, key: str) -> Deferred[bool]:
        check_key(key)
        return self._call("looking up " + key, lambda: self._lookup(key) is not None)

    def check_blob(self, hexdigest: str, size: int, md5: str | None) -> Deferred[str]:
        key = blob_key(check_hex(hexdigest))

        def note(state: str) -> str:
            # On the reactor thread, which alone touches what is known. An intact blob is
            # still looked up when first served: the lookup gives its size, checked against
            # the manifest, so an object replaced in between is refused, not redirected to.
            if state != INTACT:
                self._known.pop(key, None)
            return state

        return self._call("checking " + key, self._check, key, size, md5).addCallback(note)

    def locate_blob(self, hexdigest: str) -> Deferred[BlobLocation | None]:
        key = blob_key(check_hex(hexdigest))
        return Deferred.fromCoroutine(self._locate(key))

    # --- what each backend makes its own way (blocking, run through _call) --------

    def _lookup(self, key: str) -> Found | None:
        """The object's metadata, or None when there is none."""
        raise NotImplementedError

    def _check(self, key: str, size: int, md5: str | None) -> str:
        """``check_blob``'s answer for ``key``, from one metadata lookup."""
        raise NotImplementedError

    def _commit(self, staged: str, key: str, info: BlobInfo) -> None:
        """Upload ``staged`` as ``key`` unless an identical object is there; the staged
        file is gone afterwards."""
        raise NotImplementedError

    def _url(self, key: str) -> str:
        """The URL a client is redirected to for ``key``."""
        raise NotImplementedError

    # --- helpers -------------------------------------------------------------------

    def _damaged(self, key: str, actual: object, size: int) -> str:
        log.warn("{key} does not match its record (size {actual}, expected {size}): damaged",
                 key=key, actual=actual, size=size, backend=self.backend)
        return DAMAGED

    async def _locate(self, key: str) -> BlobLocation | None:
        size = None
        known_at = self._known.get(key)
        if known_at is None or self._clock.seconds() - known_at > KNOWN_FOR:
            found = await self._call("looking up " + key, self._lookup, key)
            if found is None:
                self._known.pop(key, None)
                self._urls.pop(key)
                return None
            # The lookup's metadata says the size: the API checks it against the manifest.
            size = found.size
            self._remember(key)
        self._known.move_to_end(key)
        # A URL is made once and reused for half its life: a signature (RSA here, or a
        # call to IAM, or credentials to refresh) is not made again for every pull.
        url = self._urls.get(key)
        if url is None:
            if self._url_blocks:
                url = await self._call("signing a URL for " + key, self._url, key)
            else:
                url = self._url(key)
            self._urls.put(key, url, self._url_lifetime)
        return Redirect(url, size)

    def _forget(self, key: str) -> None:
        """A removed object is known no more, and its URL goes with it."""
        self._known.pop(key, None)
        self._urls.pop(key)

    def _remember(self, key: str) -> None:
        self._known[key] = self._clock.seconds()
        self._known.move_to_end(key)
        while len(self._known) > self._known_max:
            self._known.popitem(last=False)

    def _call(self, action: str, fn: Callable[..., T], *args: Any, size: int = 0) -> Deferred[T]:
        """Run a blocking call through the offload, within the deadline (longer for
        ``size`` bytes to move) and the circuit breaker; failures become StorageError."""

        def failed(failure: Failure) -> Failure:
            if failure.check(StorageError):
                return failure
            if failure.check(*self._failures):
                log.error("{action} failed: {error}", action=action, error=str(failure.value),
                          backend=self.backend)
                raise StorageError(f"{action} failed: {failure.value}")
            return failure

        deadline = self._deadline + size / MIN_TRANSFER_RATE
        return self.breaker.call(action, lambda: self._offload(fn, *args).addErrback(failed), deadline)
