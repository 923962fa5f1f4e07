"""What every layer knows of a blob: its digest, size and MD5, and the spelling of digests.

Pure: no I/O, no Twisted.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

SHA256 = "sha256:"


@dataclass(frozen=True)
class BlobInfo:
    """What is known of a written blob."""

    digest: str  # "sha256:<hex>" of the bytes as stored (compressed for layers)
    diff_id: str  # "sha256:<hex>" of the uncompressed tar; equals digest for non-layer blobs
    size: int  # bytes as stored
    md5: str | None  # hex MD5 of the bytes as stored; None where the storage checks none


def blob_info(data: bytes) -> BlobInfo:
    """Digest, size and MD5 of a small in-memory blob (config, manifest)."""
    digest = SHA256 + hashlib.sha256(data).hexdigest()
    return BlobInfo(digest=digest, diff_id=digest, size=len(data), md5=hashlib.md5(data).hexdigest())


def hex_of(digest: object) -> str | None:
    """The hex of a well-formed ``sha256:<64 hex>`` digest found in a record, else None."""
    if isinstance(digest, str) and digest.startswith(SHA256) and len(digest) == 71:
        hexdigest = digest[7:]
        if all(c in "0123456789abcdef" for c in hexdigest):
            return hexdigest
    return None
