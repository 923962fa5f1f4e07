"""Serving signatures: the ``sha256-<hex>.sig`` tag of a repository, signed when first
asked and kept as blobs.

A signature binds a manifest digest to a repository, and a client's policy trusts that
binding (``matchRepository``). So the request never chooses what is signed: a digest is
signed only for a name that stands for it here (the name was built, at ``latest`` or at a
tag it was pulled at, and resolves to that digest), and only under an identity the
operator configured (``NIXERY_SIGNING_IDENTITY``: the registry hosts clients pull by; the
request's ``Host`` picks among them, never adds one). A lookup for anything else is a 404
that writes nothing.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from nixeryd.image import cosign
from nixeryd.image.manifest import OCI_MANIFEST, StoredManifest
from nixeryd.image.names import ImageSpec
from nixeryd.registry.images import Images
from nixeryd.storage.blobstore import BlobStore

MAX_CACHED = 10_000


class Signatures:
    def __init__(self, key: cosign.SigningKey, identities: Sequence[str], blobs: BlobStore,
                 images: Images) -> None:
        if not identities:
            raise ValueError("signing needs at least one identity")
        self._key = key
        self._identities = tuple(identities)
        self._blobs = blobs
        self._images = images
        self._cache: OrderedDict[tuple[str, str], StoredManifest] = OrderedDict()

    def identity(self, host: str) -> str:
        """The configured identity a request for ``host`` is signed under: that host where
        it is one of them, else the first."""
        wanted = host.strip().lower()
        for identity in self._identities:
            if identity.lower() == wanted:
                return identity
        return self._identities[0]

    async def signature(self, image: ImageSpec, hexdigest: str, host: str) -> StoredManifest | None:
        """The signature manifest binding manifest ``sha256:<hexdigest>`` to repository
        ``image.name``, or None when the name does not stand for that digest here."""
        reference = f"{self.identity(host)}/{image.name}"
        cached = self._cache.get((reference, hexdigest))
        if cached is not None:
            self._cache.move_to_end((reference, hexdigest))
            return cached
        if not await self._images.stands_for(image, "sha256:" + hexdigest):
            return None
        subject = await self._blobs.stored_manifest("sha256:" + hexdigest)
        if subject is None:
            return None
        artifact = cosign.signature_artifact(self._key, reference, subject.digest)
        await self._blobs.put_blob(artifact.payload)
        await self._blobs.put_blob(artifact.config)
        stored = await self._blobs.store_manifest(artifact.manifest, OCI_MANIFEST)
        self._cache[(reference, hexdigest)] = stored
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return stored
