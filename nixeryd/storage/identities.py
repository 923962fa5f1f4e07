"""Blob identities on the filesystem backend: what each committed blob's file was (inode,
change time, size), kept under ``identities/<hex>``, so that a blob whose file is not that
file any more (rewritten in place, truncated, replaced, restored from a backup) is hashed
again before it is served or reused, and no blob is hashed on every request."""
from __future__ import annotations

import hashlib
import os
import secrets

from twisted.logger import Logger

from nixeryd.storage.interface import DAMAGED, remove_quietly

log = Logger()

IDENTITIES = "identities"
CHUNK = 1024 * 1024


def version(st: os.stat_result) -> str:
    return f"{st.st_ino}.{st.st_ctime_ns}.{st.st_size}"


UNSURE = "unsure"


def as_committed(root: str, path: str, hexdigest: str) -> os.stat_result | str | None:
    """Blocking, but a stat and a small read: the blob's stat when its file is the one
    committed, None when there is none, ``UNSURE`` when the file changed since (or was
    committed before identities were kept)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    try:
        with open(os.path.join(root, IDENTITIES, hexdigest), encoding="ascii") as f:
            recorded = f.read()
    except (FileNotFoundError, UnicodeDecodeError):
        return UNSURE
    return st if recorded == version(st) else UNSURE


def recommit(root: str, path: str, hexdigest: str) -> os.stat_result | str | None:
    """Blocking: hash a blob whose file changed since it was committed; its stat, recorded
    as its identity anew, when its bytes are still its digest; ``DAMAGED`` otherwise."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            while chunk := f.read(CHUNK):
                digest.update(chunk)
            after = os.fstat(f.fileno())
    except FileNotFoundError:
        return None
    if digest.hexdigest() != hexdigest or version(before) != version(after):
        log.warn("stored blob {digest} does not hash to its name: damaged", digest=hexdigest)
        return DAMAGED
    record_identity(root, hexdigest, after)
    return after


def record_identity(root: str, hexdigest: str, st: os.stat_result) -> None:
    """Blocking: remember what the committed file of a blob is."""
    final = os.path.join(root, IDENTITIES, hexdigest)
    temporary = final + "." + secrets.token_hex(8)
    try:
        with open(temporary, "w", encoding="ascii") as f:
            f.write(version(st))
        os.replace(temporary, final)
    finally:
        remove_quietly(temporary)
