"""Cache keys: the identity of a build (packages, platform, flavour, package set), under
which its image record and lease are stored. Pure."""
from __future__ import annotations

import hashlib
import json
from typing import Sequence

from nixeryd.image.names import Arch, ImageSpec

IMAGE_LAYOUT = 5
"""What images hold beyond their packages, and how their layers are written; raised when
that changes (2: /etc/passwd, /etc/group, /etc/nsswitch.conf; 3: an SBOM; 4: layers
compressed block by block on every core; 5: gzip a member a block by libdeflate, zstd with
parameters of nixeryd's own), so that cached images are built again."""


def image_cache_key(image: ImageSpec, source_identity: str, layout: int = IMAGE_LAYOUT) -> str:
    """The identity of a build: packages, architecture, shell, package set and the image
    layout (an earlier ``layout`` gives the key an earlier version stored its image under)."""
    return _key(
        {
            "packages": list(image.packages),
            "system": image.arch.nix_system,
            "shell": image.shell,
            "source": source_identity,
            "layout": layout,
            "nonroot": image.nonroot,
            "run": image.first if image.run else None,
        }
    )


def index_cache_key(image: ImageSpec, platforms: Sequence[Arch], source_identity: str) -> str:
    """The identity of a multi-platform index of ``image``."""
    return _key(
        {
            "index": [a.nix_system for a in platforms],
            "packages": list(image.packages),
            "shell": image.shell,
            "source": source_identity,
            "layout": IMAGE_LAYOUT,
            "nonroot": image.nonroot,
            "run": image.first if image.run else None,
        }
    )


def _key(doc: object) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


MAX_KEYS = 10_000


class CacheKeys:
    """The cache keys of the specs asked for lately: a warm pull hashes nothing to find its key."""

    def __init__(self) -> None:
        self._keys: dict[tuple[ImageSpec, str], str] = {}

    def known(self, image: ImageSpec, identity: str) -> str | None:
        return self._keys.get((image, identity))

    def of(self, image: ImageSpec, identity: str) -> str:
        key = self._keys.get((image, identity))
        if key is None:
            key = self._keys[(image, identity)] = image_cache_key(image, identity)
            while len(self._keys) > MAX_KEYS:
                del self._keys[next(iter(self._keys))]
        return key
