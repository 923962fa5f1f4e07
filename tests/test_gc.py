"""Garbage collection keeps what kept images need and blobs still being written."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nixeryd.build.builder import ImageBuilder
from nixeryd.build.pkgsource import GitSource
from nixeryd.core.offload import inline
from nixeryd.image.manifest import ImageManifests
from nixeryd.image.names import parse_name
from nixeryd.registry.gc import collect
from nixeryd.registry.images import Images
from tests.fakes import FakeNix, make_store
from tests.memory import MemoryStorage
from tests.test_api import DEPENDENCIES

DAY = 86400.0
REV = "b" * 40


class CollectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.storage = MemoryStorage(now=self.clock.seconds)
        self.nix = FakeNix(make_store(Path(self.mktemp()).absolute(), DEPENDENCIES), DEPENDENCIES)
        source = GitSource("https://git.internal/pkgs.git")
        builder = ImageBuilder(nix=self.nix, storage=self.storage, offload=inline, source=source,
                               clock=self.clock, popularity={})
        self.images = Images(builder, self.storage, source, self.clock)

    def pull(self, name: str) -> ImageManifests:
        d: Deferred[ImageManifests] = self.images.manifests(parse_name(name), REV)
        return self.successResultOf(d)

    def blobs(self, manifests: ImageManifests) -> set[str]:
        doc = json.loads(manifests.oci.body)
        digests = {manifests.oci.digest, manifests.docker.digest, doc["config"]["digest"]}
        digests |= {layer["digest"] for layer in doc["layers"]}
        if manifests.sbom is not None:  # the SBOM, its artifact manifest and config go with it
            attached = json.loads(manifests.sbom.body)
            digests |= {manifests.sbom.digest, attached["config"]["digest"]}
            digests |= {layer["digest"] for layer in attached["layers"]}
        return {d.removeprefix("sha256:") for d in digests}

    def stored(self) -> set[str]:
        listed = self.successResultOf(self.storage.list("layers"))
        return {o.key.removeprefix("layers/") for o in listed}

    def test_keeps_served_images_and_removes_the_rest(self) -> None:
        """Blobs of images served within the window stay; those only stale images used go."""
        alpha, beta = self.pull("alpha"), self.pull("beta")
        self.clock.advance(10 * DAY)
        self.assertEqual(self.pull("alpha").oci.digest, alpha.oci.digest)
        report = self.successResultOf(
            collect(self.storage, keep_seconds=7 * DAY, now=self.clock.seconds()))
        left = self.stored()
        self.assertTrue(self.blobs(alpha) <= left)
        only_beta = self.blobs(beta) - self.blobs(alpha)
        self.assertTrue(only_beta and not (only_beta & left))
        self.assertEqual((report.kept_images, report.removed_images), (1, 1))
        self.assertEqual(report.removed_blobs, len(only_beta))
        records = self.successResultOf(self.storage.list("builds"))
        for record in records:
            digest = json.loads(self.successResultOf(self.storage.get(record.key)))["digest"]
            self.assertIn(digest.removeprefix("sha256:"), left)
        calls = len(self.nix.calls)
        self.assertEqual(self.pull("beta").oci.digest, beta.oci.digest)
        self.assertEqual(len(self.nix.calls), calls + 1)

    def test_nothing_served_within_the_window_is_collected(self) -> None:
        """An image pulled every ten minutes for ten hours survives gc with a 0.1-day window
        run between every pull (a served time refreshed twice a day lost it after 2.4 hours)."""
        alpha = self.pull("alpha")
        for _ in range(60):
            self.clock.advance(600)
            self.assertEqual(self.pull("alpha").oci.digest, alpha.oci.digest)
            report = self.successResultOf(collect(self.storage, keep_seconds=0.1 * DAY, now=self.clock.seconds()))
            self.assertEqual(report.removed_images, 0)
            self.assertTrue(self.blobs(alpha) <= self.stored())
        self.assertEqual(len(self.nix.calls), 1)

    def test_new_blobs_stay_whatever_refers_to_them(self) -> None:
        """A blob written within the window stays even when no image refers to it yet."""
        self.pull("alpha")
        self.clock.advance(30 * DAY)
        self.successResultOf(self.storage.put("layers/" + "c" * 64, b"being built", "application/octet-stream"))
        self.successResultOf(collect(self.storage, keep_seconds=7 * DAY, now=self.clock.seconds()))
        self.assertEqual(self.stored(), {"c" * 64})

    def test_dry_run_removes_nothing(self) -> None:
        """A dry run reports what would go and leaves storage as it was."""
        self.pull("alpha")
        before = self.stored()
        self.clock.advance(30 * DAY)
        report = self.successResultOf(
            collect(self.storage, keep_seconds=DAY, now=self.clock.seconds(), dry_run=True))
        self.assertEqual(report.removed_blobs, len(before))
        self.assertEqual(self.stored(), before)

    def test_only_leases_expired_for_a_day_go(self) -> None:
        """A live lease, one expired an hour ago and a failure record are kept; a lease
        whose holder died more than a day ago (and an unreadable one as old) goes."""
        from nixeryd.storage.interface import ABSENT
        from nixeryd.storage.records import LeaseRecord

        now = self.clock.seconds()
        records = {
            "live": LeaseRecord("building", "a:1:x", now + 60).encode(),
            "fresh-expired": LeaseRecord("building", "b:2:x", now - 3600).encode(),
            "failed": LeaseRecord("failed", "c:3:x", now + 60, {"kind": "failed", "message": "m"}).encode(),
        }
        keys = {}
        for name, data in records.items():
            keys[name] = "leases/" + hashlib.sha256(name.encode()).hexdigest()
            self.storage.write_if(keys[name], data, "application/json", ABSENT)
        self.clock.advance(2 * DAY)
        dead = "leases/" + hashlib.sha256(b"dead").hexdigest()
        self.storage.put(dead, LeaseRecord("building", "d:4:x", now - 1).encode(), "application/json")
        report = self.successResultOf(collect(self.storage, keep_seconds=DAY, now=self.clock.seconds()))
        left = {o.key for o in self.successResultOf(self.storage.list("leases"))}
        # Two days on, all three first records are more than a day past expiry: they go;
        # the dead holder's lease was written just now, so it stays until it is a day old.
        self.assertEqual(left, {dead})
        self.assertEqual(report.removed_leases, 3)
        self.clock.advance(2 * DAY)
        self.successResultOf(collect(self.storage, keep_seconds=DAY, now=self.clock.seconds()))
        self.assertEqual(self.successResultOf(self.storage.list("leases")), [])
