"""Manifests read back from storage by digest."""
from __future__ import annotations

import hashlib
import json

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.core.offload import inline
from nixeryd.storage.blobstore import BlobStore
from tests.memory import MemoryStorage


class StoredManifestTests(SynchronousTestCase):
    """Manifests read back from storage by digest, small (hashed inline) and large (hashed
    through the offload, as a manifest of hundreds of layers would be)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.storage = MemoryStorage(now=self.clock.seconds)
        self.blobs = BlobStore(self.storage, inline)

    def manifest(self, layers: int) -> bytes:
        layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "size": 1,
                 "digest": "sha256:" + "a" * 64}
        return json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 1,
                                      "digest": "sha256:" + "b" * 64},
                           "layers": [layer] * layers}).encode()

    def test_small_and_large_manifests_come_back(self) -> None:
        for layers in (3, 2000):
            body = self.manifest(layers)
            stored = self.successResultOf(Deferred.fromCoroutine(
                self.blobs.store_manifest(body, "application/vnd.oci.image.manifest.v1+json")))
            found = self.successResultOf(Deferred.fromCoroutine(self.blobs.stored_manifest(stored.digest)))
            self.assertEqual(found.body, body)
        self.assertGreater(len(self.manifest(2000)), 64 * 1024)

    def test_a_large_manifest_not_matching_its_digest_is_ignored(self) -> None:
        body = self.manifest(2000)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.storage.put("layers/" + digest[7:], body[:-1] + b" ", "application/octet-stream")
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(self.blobs.stored_manifest(digest))))
