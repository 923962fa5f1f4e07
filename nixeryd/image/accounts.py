"""The accounts every image knows, and the nonroot user: the files that say so. Pure.

As dockerTools' ``fakeNss`` does: ``root`` and ``nobody`` in ``/etc/passwd`` and
``/etc/group``, and ``/etc/nsswitch.conf`` saying to read them (and DNS for hosts), so
that programs asking who they are (``id``, ``whoami``, OpenSSH, Python's ``getpass``)
get an answer. A package that provides one of these files keeps its own. The
``nonroot`` meta-package adds ``nonroot``, 65532:65532 (the number distroless images
use), with a home directory of its own.
"""
from __future__ import annotations

NONROOT_ID = 65532
NONROOT_HOME = "home/nonroot"
NONROOT_USER = f"{NONROOT_ID}:{NONROOT_ID}"


def account_files(nonroot: bool) -> dict[str, bytes]:
    """``etc/passwd``, ``etc/group`` and ``etc/nsswitch.conf`` for an image."""
    passwd = [
        "root:x:0:0:root:/root:/bin/sh",
        "nobody:x:65534:65534:nobody:/var/empty:/bin/false",
    ]
    group = ["root:x:0:", "nobody:x:65534:"]
    if nonroot:
        passwd.append(f"nonroot:x:{NONROOT_ID}:{NONROOT_ID}:nonroot:/{NONROOT_HOME}:/bin/sh")
        group.append(f"nonroot:x:{NONROOT_ID}:")
    return {
        "etc/passwd": ("\n".join(passwd) + "\n").encode(),
        "etc/group": ("\n".join(group) + "\n").encode(),
        "etc/nsswitch.conf": b"passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n",
    }


def homes(nonroot: bool) -> dict[str, int]:
    """Directories owned by a user other than root: path -> uid (and gid)."""
    return {NONROOT_HOME: NONROOT_ID} if nonroot else {}
