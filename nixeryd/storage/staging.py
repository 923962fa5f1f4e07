"""Staging: where blobs are written before they are committed, named so that what a
killed process left behind is recognised and removed at the next start (by any backend)."""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import time

HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
_STAGED = re.compile(r"[a-z]+-(?P<host>[A-Za-z0-9._-]+)-(?P<pid>[0-9]+)-[0-9a-f]{32}")
STALE_STAGING = 24 * 3600.0


def staging_name(directory: str, kind: str) -> str:
    """A new file name in a staging directory, saying whose it is (``remove_leftovers``)."""
    return os.path.join(directory, f"{kind}-{HOST}-{os.getpid()}-{secrets.token_hex(16)}")


def remove_leftovers(staging: str) -> int:
    """Blocking, at start-up: remove what dead processes left in ``staging`` (uploads and
    writes a kill -9 cut short); the number removed."""
    removed = 0
    with os.scandir(staging) as entries:
        leftovers = [entry.path for entry in entries if _left_over(entry)]
    for path in leftovers:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            continue
        removed += 1
    return removed


def _left_over(entry: os.DirEntry[str]) -> bool:
    """Whether a staging entry was left by a process that is gone: one of this host
    whose process is no longer running (or has our id: an earlier process's), one of
    another host a day old, or one not named as this module names them."""
    named = _STAGED.fullmatch(entry.name)
    if named is None or entry.is_dir(follow_symlinks=False):
        return True
    if named["host"] == HOST:
        pid = int(named["pid"])
        return pid == os.getpid() or not _running(pid)
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_STAGING
    except FileNotFoundError:
        return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
