"""Serving signatures: the ``sha256-<hex>.sig`` tag of a repository, for an image
manifest nixeryd stores, signed when first asked and kept as blobs.

The signed identity is the repository as the client named it, behind the host from
``NIXERY_SIGNING_IDENTITY`` or else the request's ``Host``: what a client's policy
compares with the reference it pulled (``matchRepository``).
"""
from __future__ import annotations

from collections import OrderedDict

from nixeryd import cosign
from nixeryd.builder import ImageBuilder
from nixeryd.manifest import StoredManifest

MAX_CACHED = 10_000


class Signatures:
    def __init__(self, key: cosign.SigningKey, identity: str | None, builder: ImageBuilder) -> None:
        self._key = key
        self._identity = identity
        self._builder = builder
        self._cache: OrderedDict[tuple[str, str], StoredManifest] = OrderedDict()

    async def signature(self, name: str, hexdigest: str, host: str) -> StoredManifest | None:
        """The signature manifest for manifest ``sha256:<hexdigest>`` of repository ``name``,
        or None when no such manifest is stored (nothing to sign)."""
        reference = f"{self._identity or host}/{name}"
        cached = self._cache.get((reference, hexdigest))
        if cached is not None:
            self._cache.move_to_end((reference, hexdigest))
            return cached
        subject = await self._builder.stored_manifest("sha256:" + hexdigest)
        if subject is None:
            return None
        artifact = cosign.signature_artifact(self._key, reference, subject.digest)
        await self._builder.put_blob(artifact.payload)
        await self._builder.put_blob(artifact.config)
        stored = await self._builder.store_manifest(artifact.manifest, cosign.OCI_MANIFEST)
        self._cache[(reference, hexdigest)] = stored
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
        return stored
