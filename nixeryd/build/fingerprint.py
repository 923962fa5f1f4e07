"""What a package set on local disk holds now, as a short fingerprint: images of a path
source are cached under it, so an edited set is built fresh at the next pull and an
unchanged one never is.

The fingerprint hashes what every file and directory under the path is (its relative
name, type, mode, size, modification time in nanoseconds, inode, and a link's target),
leaving out ``.git``'s insides: any edit, replacement or new file changes it, without
reading the files. The walk runs in a thread; pulls within ``interval`` seconds of a
walk (``NIXERY_PATH_RECHECK``) share its answer, and pulls during a walk wait for it.
"""
from __future__ import annotations

import hashlib
import os
import stat
from typing import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from nixeryd.core.cache import SingleFlight
from nixeryd.core.offload import Offload

INTERVAL = 1.0
MISSING = "missing"


def fingerprint(root: str) -> str:
    """Blocking: the fingerprint of the tree at ``root`` (``missing`` when there is none)."""
    digest = hashlib.sha256()
    try:
        top = os.stat(root)
    except OSError:
        return MISSING
    digest.update(_describe(".", top, root))
    if stat.S_ISDIR(top.st_mode):
        for directory, subdirectories, files in os.walk(root, onerror=None):
            subdirectories[:] = sorted(d for d in subdirectories if not (directory == root and d == ".git"))
            for name in sorted(subdirectories + files):
                path = os.path.join(directory, name)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue  # gone while walking: the next walk sees the change
                digest.update(_describe(os.path.relpath(path, root), info, path))
    return digest.hexdigest()[:32]


def _describe(name: str, info: os.stat_result, path: str) -> bytes:
    target = ""
    if stat.S_ISLNK(info.st_mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
    fields = (name, info.st_mode, info.st_size if not stat.S_ISDIR(info.st_mode) else 0,
              info.st_mtime_ns, info.st_ino, target)
    return ("\0".join(str(f) for f in fields) + "\n").encode("utf-8", "surrogateescape")


class PathFingerprint:
    """The fingerprint of one package set's directory, walked at most once per ``interval``."""

    def __init__(self, root: str, offload: Offload, clock: IReactorTime, interval: float = INTERVAL,
                 walk: Callable[[str], str] = fingerprint) -> None:
        self._root = root
        self._offload = offload
        self._clock = clock
        self._interval = interval
        self._walk = walk
        self._flight: SingleFlight[str] = SingleFlight()
        self._last: tuple[float, str] | None = None

    def fresh(self) -> str | None:
        """The fingerprint when a walk begun within ``interval`` seconds gave it, else None."""
        if self._last is not None and self._clock.seconds() - self._last[0] < self._interval:
            return self._last[1]
        return None

    def current(self) -> Deferred[str]:
        """The fingerprint as of a walk begun at most ``interval`` seconds ago."""
        now = self._clock.seconds()
        if self._last is not None and now - self._last[0] < self._interval:
            return succeed(self._last[1])
        return self._flight.run(self._root, lambda: self._measure(now))

    async def _measure(self, started: float) -> str:
        found: str = await self._offload(self._walk, self._root)
        self._last = (started, found)
        return found
