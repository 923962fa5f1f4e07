"""The filesystem backend: the default, embedded store under one directory.

Every object is first written under ``staging/``, fsynced, renamed into place
with ``os.replace`` and its directory fsynced: a crash never leaves a partial
object under a served key, only a leftover staging file, which the next start
removes. Staging files carry their writer's host and process id, so that
several instances can share one directory (a fleet on a shared file system):
a start removes only what a dead process of its own host left, and anything a
day old. Conditional writes (``write_if``) hold an ``flock`` on
``leases/.lock`` around their check and rename. All file I/O after start-up
goes through the injected ``Offload``.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import shutil
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from nixeryd.core.blobs import BlobInfo
from nixeryd.core.offload import Offload
from nixeryd.storage.identities import IDENTITIES, UNSURE, as_committed, recommit, record_identity, version
from nixeryd.storage.interface import (
    ABSENT,
    DAMAGED,
    INTACT,
    MISSING,
    BlobLocation,
    Generation,
    IStorage,
    LocalFile,
    StorageError,
    StoredObject,
    blob_hex,
    check_hex,
    check_key,
    check_prefix,
    remove_quietly,
    storage_error,
)
from nixeryd.storage.records import LEASES, PREFIXES, blob_key, hex_of_key, is_blob_key
from nixeryd.storage.staging import remove_leftovers, staging_name

log = Logger()

STAGING = "staging"
"""``identities/<hex>``: what a blob's file was when it was committed (inode, change time,
size). A file that is not that file any more (rewritten in place, truncated, replaced,
restored from a backup) is hashed whole once, in a thread, before it is served or reused
again: as it should be, and it is trusted anew; otherwise it is damaged."""
_COPY_CHUNK = 1024 * 1024
"""Seconds after which a staging file of any host is taken as a leftover."""
LOCK = ".lock"
_T = TypeVar("_T")


@implementer(IStorage)
class FilesystemStorage:
    """Objects as files under ``root``; blobs are served from disk."""

    backend = "filesystem"
    checks_md5 = False

    def __init__(self, root: str, offload: Offload) -> None:
        """Create the layout under ``root`` and remove leftovers of a crash.

        Blocking, and meant for start-up: a root that cannot be created or
        written raises ``ValueError`` naming the path.
        """
        self.root = os.path.abspath(root)
        self._offload = offload
        self._staging = os.path.join(self.root, STAGING)
        removed = _prepare(self.root)
        if removed:
            log.info(
                "removed {count} leftover staging files under {path}",
                count=removed,
                path=self._staging,
                backend=self.backend,
            )

    # --- IStorage ----------------------------------------------------------------

    def staging_path(self) -> str:
        return self._temporary("blob")

    def commit_blob(self, staged: str, info: BlobInfo) -> Deferred[None]:
        hexdigest = blob_hex(info)
        return Deferred.fromCoroutine(
            self._run("committing blob " + info.digest, self._commit, staged, hexdigest, info.size)
        )

    def discard(self, staged: str) -> None:
        remove_quietly(staged)

    def put(self, key: str, data: bytes, content_type: str) -> Deferred[None]:
        path = self._path(key)
        return Deferred.fromCoroutine(self._run("writing " + key, self._write, path, bytes(data)))

    def get(self, key: str) -> Deferred[bytes | None]:
        path = self._path(key)
        return Deferred.fromCoroutine(self._run("reading " + key, _read, path))

    def has(self, key: str) -> Deferred[bool]:
        path = self._path(key)
        return self._stat("looking up " + key, _exists, path)

    def check_blob(self, hexdigest: str, size: int, md5: str | None) -> Deferred[str]:
        return Deferred.fromCoroutine(self._check_blob(check_hex(hexdigest), size))

    async def _check_blob(self, hexdigest: str, size: int) -> str:
        st = await self._committed(hexdigest)
        if st is None:
            return MISSING
        if not isinstance(st, os.stat_result) or st.st_size != size:
            log.warn("stored blob {digest} is not as it was committed ({size} bytes): damaged",
                     digest=hexdigest, size=size)
            return DAMAGED
        return INTACT

    async def _committed(self, hexdigest: str) -> os.stat_result | str | None:
        """The blob's file as it was committed (its stat), ``DAMAGED``, or None when absent:
        a stat and a small read on the calling thread; a whole hash, in a thread, only for
        a file that changed since."""
        path = self._path(blob_key(hexdigest))
        found = await self._stat("looking up blob " + hexdigest, as_committed, self.root, path, hexdigest)
        if found is not UNSURE:
            return found
        return await self._run("checking blob " + hexdigest, recommit, self.root, path, hexdigest)

    def hash_blob(self, hexdigest: str) -> Deferred[tuple[str, int] | None]:
        path = self._path(blob_key(check_hex(hexdigest)))
        return Deferred.fromCoroutine(self._run("reading blob " + hexdigest, _hash_file, path))

    def locate_blob(self, hexdigest: str) -> Deferred[BlobLocation | None]:
        return Deferred.fromCoroutine(self._locate_blob(check_hex(hexdigest)))

    async def _locate_blob(self, hexdigest: str) -> BlobLocation | None:
        st = await self._committed(hexdigest)
        if not isinstance(st, os.stat_result):
            return None  # absent, or damaged: never served
        return LocalFile(path=self._path(blob_key(hexdigest)), size=st.st_size)

    def list(self, prefix: str) -> Deferred[list[StoredObject]]:
        directory = os.path.join(self.root, check_prefix(prefix))
        return Deferred.fromCoroutine(self._run("listing " + prefix, _listing, directory, prefix))

    def read(self, key: str) -> Deferred[tuple[bytes, Generation] | None]:
        path = self._path(key)
        return Deferred.fromCoroutine(self._run("reading " + key, _read_versioned, path))

    def write_if(self, key: str, data: bytes, content_type: str,
                 generation: Generation) -> Deferred[Generation | None]:
        path = self._path(key)
        return Deferred.fromCoroutine(
            self._run("writing " + key, self._write_if, path, bytes(data), generation))

    def delete(self, key: str, generation: Generation | None = None) -> Deferred[None]:
        path = self._path(key)
        if is_blob_key(key):
            _unlink(os.path.join(self.root, IDENTITIES, hex_of_key(key)))
        if generation is None:
            return Deferred.fromCoroutine(self._run("removing " + key, _unlink, path))
        return Deferred.fromCoroutine(self._run("removing " + key, self._unlink_if, path, generation))

    # --- helpers -----------------------------------------------------------------

    def _path(self, key: str) -> str:
        return os.path.join(self.root, check_key(key))

    def _stat(self, action: str, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """``fn(*args)``, a single stat, run at once on the calling thread: a stat of a
        file the page cache holds costs microseconds, less than a trip through a thread
        pool, and a warm blob request must never queue behind other work."""
        try:
            return succeed(fn(*args))
        except OSError as e:
            error = storage_error(action + " in " + self.root, e)
            log.error("{error}", error=str(error), backend=self.backend)
            return fail(error)

    async def _run(self, action: str, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` through the offload; an ``OSError`` becomes a ``StorageError``."""
        try:
            result: _T = await self._offload(fn, *args)
        except OSError as e:
            error = storage_error(action + " in " + self.root, e)
            log.error("{error}", error=str(error), backend=self.backend)
            raise error from e
        return result

    def _temporary(self, kind: str) -> str:
        return staging_name(self._staging, kind)

    def _locked(self) -> int:
        """Blocking: an open descriptor of the lock file, locked; closing it unlocks."""
        fd = os.open(os.path.join(self.root, LEASES, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _write_if(self, path: str, data: bytes, generation: Generation) -> Generation | None:
        """Blocking: under the lock, replace ``path`` when its generation is ``generation``."""
        tmp = self._temporary("cond")
        try:
            _write_durably(tmp, data)
            fd = self._locked()
            try:
                if _generation(path) != generation:
                    return None
                os.replace(tmp, path)
                _fsync_dir(os.path.dirname(path))
                return _generation(path)
            finally:
                os.close(fd)
        finally:
            remove_quietly(tmp)

    def _unlink_if(self, path: str, generation: Generation) -> None:
        fd = self._locked()
        try:
            if _generation(path) == generation:
                _unlink(path)
        finally:
            os.close(fd)

    def _write(self, path: str, data: bytes) -> None:
        """Blocking: write ``data`` to staging, make it durable, rename it to ``path``."""
        tmp = self._temporary("put")
        try:
            _write_durably(tmp, data)
            os.replace(tmp, path)
            _fsync_dir(os.path.dirname(path))
        finally:
            remove_quietly(tmp)

    def _commit(self, staged: str, hexdigest: str, size: int) -> None:
        """Blocking: move a staged blob to ``layers/<hexdigest>``; the staged file is gone after."""
        target = self._path(blob_key(hexdigest))
        moving = staged
        try:
            found = as_committed(self.root, target, hexdigest)
            if found is UNSURE:
                found = recommit(self.root, target, hexdigest)
            if isinstance(found, os.stat_result) and found.st_size == size:
                return
            actual = os.stat(staged).st_size
            if actual != size:
                raise StorageError(
                    f"staged blob sha256:{hexdigest} has {actual} bytes, expected {size}; not committed"
                )
            if os.path.dirname(os.path.abspath(staged)) != self._staging:
                # Elsewhere (perhaps another file system): copy into staging first.
                moving = self._temporary("copy")
                _copy(staged, moving)
            _fsync_file(moving)
            os.replace(moving, target)
            _fsync_dir(os.path.dirname(target))
            record_identity(self.root, hexdigest, os.stat(target))
        finally:
            remove_quietly(moving)
            remove_quietly(staged)


def _prepare(root: str) -> int:
    """Create the layout, check it is writable, empty staging; the number of leftovers removed."""
    try:
        for name in PREFIXES + (STAGING, IDENTITIES):
            os.makedirs(os.path.join(root, name), exist_ok=True)
        staging = os.path.join(root, STAGING)
        probe = os.path.join(staging, "probe-" + secrets.token_hex(8))
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
        removed = remove_leftovers(staging)
    except OSError as e:
        where = e.filename or root
        raise ValueError(
            f"storage path {root} is not usable: {e.strerror or e} ({where})"
        ) from None
    return removed


def _write_durably(path: str, data: bytes) -> None:
    """Blocking: create ``path`` (which must not exist) holding ``data``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _generation(path: str) -> Generation:
    """The identity of the file now at ``path`` (``ABSENT`` when there is none): every
    rename into place makes a new inode with a new change time."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ABSENT
    return version(st)


def _read_versioned(path: str) -> tuple[bytes, Generation] | None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), version(st)
    except FileNotFoundError:
        return None


def _listing(directory: str, prefix: str) -> list[StoredObject]:
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            key = prefix + "/" + entry.name
            try:
                check_key(key)
                st = entry.stat(follow_symlinks=False)
            except (ValueError, FileNotFoundError):
                continue
            found.append(StoredObject(key, st.st_mtime, st.st_size, version(st)))
    return found


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _hash_file(path: str) -> tuple[str, int] | None:
    digest = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest(), size


def _exists(path: str) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


def _copy(source: str, destination: str) -> None:
    with open(source, "rb") as src, open(destination, "xb") as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some file systems cannot fsync a directory; the rename itself has happened.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


