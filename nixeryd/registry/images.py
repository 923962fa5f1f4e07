"""Images as the registry sees them: cached, built once at a time, and indexed
across platforms.

An image's manifests are remembered in memory (bounded, LRU) and in storage
under ``manifests/<key>``, so another instance on the same storage, or this one
after a restart, serves them without Nix. Images of pinned package sources are
kept for good, the others for the cache TTL.
"""
from __future__ import annotations

import dataclasses
from typing import Awaitable, Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from nixeryd.build.builder import ImageBuilder
from nixeryd.build.failures import NixError, PlatformUnavailable
from nixeryd.build.fingerprint import PathFingerprint
from nixeryd.build.pkgsource import PackageSource
from nixeryd.core.cache import SingleFlight, TTLCache, gather
from nixeryd.image import manifest
from nixeryd.image.manifest import Flavour, ImageManifests, StoredManifest
from nixeryd.image.names import ARM64, Arch, ImageSpec
from nixeryd.ops.metrics import Metrics
from nixeryd.registry.cachekeys import CacheKeys, index_cache_key
from nixeryd.registry.leases import BuildLeases
from nixeryd.registry.served import KnownImages, Served
from nixeryd.registry.tags import TagRecords
from nixeryd.storage import records
from nixeryd.storage.interface import IStorage, StorageError
from nixeryd.storage.records import TOUCH_INTERVAL, ImageRecord

log = Logger()


BODY_TTL = 3600
"""Seconds manifests are served from memory before being checked against storage."""
MAX_TAGS_LOOKED_AT = 100
"""Most tags of one name looked at to find what the name stands for."""


class Images:
    """Manifests for names and tags: from memory, from storage, or built now."""

    def __init__(
        self,
        builder: ImageBuilder,
        storage: IStorage,
        source: PackageSource,
        clock: IReactorTime,
        *,
        cache_ttl: float = 6 * 3600,
        platforms: Sequence[Arch] = (),
        metrics: Metrics | None = None,
        failure_ttl: float = 60.0,
        leases: BuildLeases | None = None,
        fingerprint: PathFingerprint | None = None,
    ) -> None:
        self._fingerprint = fingerprint
        self._builder = builder
        # Manifests are read and stored where the builder stores them.
        self._blobs = builder.blobs
        self._storage = storage
        self._source = source
        self._clock = clock
        self._ttl = cache_ttl
        self._platforms = tuple(platforms)
        self._cache: TTLCache[ImageRecord] = TTLCache(clock)
        self._flight: SingleFlight[ImageManifests] = SingleFlight()
        self.known = KnownImages()
        self._keys = CacheKeys()
        self.tag_records = TagRecords(storage, clock)
        self._touched: TTLCache[float] = TTLCache(clock)
        # The manifests themselves, so that a warm pull costs no storage access. They
        # are checked against storage again after BODY_TTL: garbage collection
        # (which keeps whatever was served within its window, longer than this)
        # may have removed an image no one pulled for a while.
        self._bodies: TTLCache[ImageManifests] = TTLCache(clock, max_entries=2048)
        self._metrics = metrics if metrics is not None else Metrics()
        # Builds that failed, remembered briefly: a client's HEAD and GET (or a CI
        # job retrying) then cost one build, not one each.
        self._failures: TTLCache[tuple[NixError, float]] = TTLCache(clock, max_entries=1024)
        self._failure_ttl = failure_ttl
        # One build of an image across the instances on this storage.
        self._leases = leases if leases is not None else BuildLeases(
            storage, clock, failure_ttl=failure_ttl)
        # What this instance served: blob sizes to check blobs against, build times,
        # which images have a layer.
        self.served = Served()

    async def catalogue(self) -> list[str]:
        """Every name pulled, by any instance on this storage."""
        stored = await self.tag_records.names()
        return sorted({*stored, *self.known.names()})

    def expected_size(self, digest: str) -> int | None:
        """The size a served manifest gives the blob ``digest``, where one is known."""
        return self.served.expected_size(digest)

    def blob_damaged(self, digest: str) -> None:
        """A blob was found not as its manifest says: forget the manifests held in memory,
        so that the next pull checks its image's blobs in storage and rebuilds what is
        damaged."""
        log.error("blob {digest} in storage does not match its manifest; images are checked "
                  "again at their next pull", digest=digest)
        self.served.forget_size(digest)
        self._bodies.clear()

    @property
    def building(self) -> int:
        """Images being built or looked up now."""
        return len(self._flight)

    def stored_manifest(self, digest: str) -> Deferred[StoredManifest | None]:
        return Deferred.fromCoroutine(self._blobs.stored_manifest(digest))

    def manifests(self, image: ImageSpec, tag: str, *, index: bool = True) -> Deferred[ImageManifests]:
        """The image at ``tag``. With platforms configured and a name that does not choose
        one itself (``arm64/...``), it is a multi-platform index, or the first platform's
        image for a client that takes no index (``index=False``)."""
        warm = self.warm(image, tag)
        if warm is not None:
            return succeed(warm)
        if self._platforms and image.arch != ARM64:
            if index:
                d = self._index(image, tag)
            else:
                d = self._image(dataclasses.replace(image, arch=self._platforms[0]), tag)
        else:
            d = self._image(image, tag)

        async def remember(result: ImageManifests) -> ImageManifests:
            self._note_served(image, tag, result)
            # Recorded before the answer (a storage write the first time a tag is seen,
            # nothing after): once a client has the manifest, every instance lists the tag.
            # A failure to record it is logged, never the pull's.
            await self.tag_records.add(image.spelling, tag)
            return result

        return d.addCallback(lambda result: Deferred.fromCoroutine(remember(result)))

    def warm(self, image: ImageSpec, tag: str) -> ImageManifests | None:
        """The manifests of ``image`` when everything a pull does is done already: its
        package set's identity known, its manifests in memory, its served time and its tag
        recorded lately. Then a pull runs no coroutine at all (most pulls are these)."""
        if self._platforms and image.arch != ARM64:
            return None
        fingerprint = self._fingerprint.fresh() if self._fingerprint is not None else ""
        if fingerprint is None:
            return None
        identity = self._identity_of(tag, fingerprint)
        key = self._keys.known(image, identity)
        if key is None:
            return None
        remembered, digests = self._bodies.get(key), self._cache.get(key)
        if remembered is None or digests is None or remembered.missing:
            return None
        if self._clock.seconds() - (self._touched.get(key) or digests.built) >= TOUCH_INTERVAL:
            return None
        if not self.tag_records.recorded(image.spelling, tag):
            return None
        self._metrics.cache_result("memory")
        self.served.note_built(digests)
        self._note_served(image, tag, remembered)
        return remembered

    def _note_served(self, image: ImageSpec, tag: str, result: ImageManifests) -> None:
        self.known.add(image.spelling, tag)
        self.served.note_users(image.spelling, result)

    def _identity_of(self, tag: str, fingerprint: str) -> str:
        identity = self._source.identity(tag)
        if self._fingerprint is not None:
            identity += "#content=" + fingerprint
        compression = self._builder.compression
        return identity if compression == "gzip" else f"{identity}#layers={compression}"

    async def _identity(self, tag: str) -> str:
        """What a build comes from: the package set (with what its directory holds now, for a
        path source), and how layers are compressed."""
        return self._identity_of(tag, await self._fingerprint.current() if self._fingerprint is not None else "")

    def _ttl_for(self, tag: str) -> float | None:
        """How long an image stays: for good when its package set cannot change under its
        key (a pinned revision, or a path source keyed by its content)."""
        return None if self._source.pinned(tag) or self._fingerprint is not None else self._ttl

    def _image(self, image: ImageSpec, tag: str) -> Deferred[ImageManifests]:
        return Deferred.fromCoroutine(self._image_at(image, tag))

    async def _image_at(self, image: ImageSpec, tag: str) -> ImageManifests:
        identity = await self._identity(tag)
        key = self._keys.of(image, identity)
        return await self._flight.run(key, lambda: self._cached_or(
            key, tag, lambda: self._builder.build(image, tag, identity=identity, ttl=self._ttl_for(tag))))

    def _index(self, image: ImageSpec, tag: str) -> Deferred[ImageManifests]:
        return Deferred.fromCoroutine(self._index_at(image, tag))

    async def _index_at(self, image: ImageSpec, tag: str) -> ImageManifests:
        key = index_cache_key(image, self._platforms, await self._identity(tag))

        async def compose() -> ImageManifests:
            wanted = [dataclasses.replace(image, arch=arch) for arch in self._platforms]
            # A platform no builder serves is left out of the index, so that clients of the
            # others get their image; any other failure is the whole index's.
            tried: list[ImageManifests | PlatformUnavailable] = await gather(
                [self._image(one, tag).addErrback(_unbuildable) for one in wanted])
            per_platform = [one for one, got in zip(wanted, tried, strict=True) if isinstance(got, ImageManifests)]
            built = [got for got in tried if isinstance(got, ImageManifests)]
            missing = tuple(one.arch.oci for one, got in zip(wanted, tried, strict=True)
                            if isinstance(got, PlatformUnavailable))
            if not built:
                first = tried[0]
                assert isinstance(first, PlatformUnavailable)
                raise first
            if missing:
                log.warn("the index of {image} leaves out {platforms}: no builder can build them",
                         image=image.name, platforms=", ".join(missing))
            stored: list[StoredManifest | None] = []
            for flavour in (Flavour.OCI, Flavour.DOCKER):
                chosen = [m.flavour(flavour) for m in built]
                if any(c is None for c in chosen):
                    stored.append(None)  # no Docker manifests: no Docker list either
                    continue
                entries = [(manifest.Descriptor(c.digest, len(c.body)), one.arch)
                           for c, one in zip(chosen, per_platform, strict=True) if c is not None]
                body = manifest.image_index(flavour, entries)
                stored.append(await self._blobs.store_manifest(body, flavour.index_type))
            assert stored[0] is not None
            return ImageManifests(oci=stored[0], docker=stored[1], missing=missing)

        return await self._flight.run(key, lambda: self._cached_or(key, tag, compose))

    async def built_as(self, image: ImageSpec) -> list[ImageManifests]:
        """Everything ``image`` stands for as built already, by any instance on this storage
        (this never builds): at ``latest`` and at every tag it was pulled at, its image in
        each flavour and, with platforms, its index and each platform's image."""
        tags = ["latest"]
        for tag in [*self.known.tags(image.spelling), *await self.tag_records.tags(image.spelling)]:
            if tag not in tags and len(tags) < MAX_TAGS_LOOKED_AT:
                tags.append(tag)
        found = []
        for tag in tags:
            identity = await self._identity(tag)
            if self._platforms and image.arch != ARM64:
                keys = [index_cache_key(image, self._platforms, identity),
                        *[self._keys.of(dataclasses.replace(image, arch=arch), identity)
                          for arch in self._platforms]]
            else:
                keys = [self._keys.of(image, identity)]
            for key in keys:
                manifests = await self._cached(key, tag, served=False)
                if manifests is not None:
                    found.append(manifests)
        return found

    async def stands_for(self, image: ImageSpec, digest: str) -> bool:
        """Whether ``image``, as built already, has the manifest ``digest``."""
        return any(digest in (m.oci.digest, m.docker.digest if m.docker else None)
                   for m in await self.built_as(image))

    async def referrers_of(self, image: ImageSpec, digest: str) -> list[StoredManifest]:
        """The artifacts attached to ``image``'s manifest ``digest`` (its SBOM), as stored:
        every instance on the same storage, and this one after a restart, knows them; another
        name knows none."""
        for manifests in await self.built_as(image):
            if manifests.oci.digest == digest and manifests.sbom is not None:
                return [manifests.sbom]
        return []

    async def _cached(self, key: str, tag: str, *, served: bool = True) -> ImageManifests | None:
        """The manifests built for ``key``, from memory or storage, or None; ``served`` when
        they are being served (counted, and the record's served time kept fresh)."""
        remembered = self._bodies.get(key)
        digests = self._cache.get(key)
        if remembered is not None and digests is not None:
            if served:
                self._metrics.cache_result("memory")
                self.served.note_built(digests)
                await self._touch(key, digests)
            return remembered
        if digests is None:
            digests = await self._stored_digests(key, tag)
        if digests is not None:
            cached = await self._load(digests)
            if cached is not None:
                self.served.note_built(digests)
                self._bodies.put(key, cached, BODY_TTL)
                self.served.note_sizes(cached)
                if served:
                    self._metrics.cache_result("storage")
                    await self._touch(key, digests)
                return cached
        return None

    async def _cached_or(
        self, key: str, tag: str, make: Callable[[], Awaitable[ImageManifests]]
    ) -> ImageManifests:
        found = await self._cached(key, tag)
        if found is not None:
            return found
        remembered_failure = self._failures.get(key)
        if remembered_failure is not None:
            self._metrics.cache_result("failure")
            failed, until = remembered_failure
            failed.retry_after = until - self._clock.seconds()
            raise failed.with_traceback(None)
        self._metrics.cache_result("miss")

        async def build() -> ImageManifests:
            made: ImageManifests = await make()
            if made.missing:
                # Incomplete: not recorded; composed again once the failures are forgotten,
                # when a builder for what is missing may be there.
                return made
            docker = made.docker.digest if made.docker is not None else None
            now = self._clock.seconds()
            digests = ImageRecord(made.oci.digest, docker, now, now,
                                  made.sbom.digest if made.sbom is not None else None)
            # Written before the lease goes: whoever finds no lease finds the record.
            self.served.note_built(digests)
            await self._write_record(key, digests)
            self._touched.put(key, digests.built, None)
            self._cache.put(key, digests, self._ttl_for(tag))
            return made

        async def built_elsewhere() -> ImageManifests | None:
            found = await self._stored_digests(key, tag)
            return None if found is None else await self._load(found)

        try:
            result = await self._leases.build_once(key, build, built_elsewhere)
        except NixError as e:
            if self._failure_ttl > 0:
                self._failures.put(key, (e, self._clock.seconds() + self._failure_ttl), self._failure_ttl)
                e.retry_after = self._failure_ttl
            raise
        self._bodies.put(key, result, self._failure_ttl if result.missing else BODY_TTL)
        if result.missing:
            now = self._clock.seconds()
            self._cache.put(key, ImageRecord(result.oci.digest, result.docker.digest if result.docker else None,
                                             now, now), self._failure_ttl)
        self.served.note_sizes(result)
        return result

    async def _write_record(self, key: str, record: ImageRecord) -> None:
        await self._storage.put(records.image_key(key), record.encode(), records.JSON)

    async def _touch(self, key: str, digests: ImageRecord) -> None:
        """Refresh the record's served time, at most every TOUCH_INTERVAL."""
        now = self._clock.seconds()
        if now - (self._touched.get(key) or digests.built) < TOUCH_INTERVAL:
            return
        self._touched.put(key, now, None)
        try:
            await self._write_record(key, dataclasses.replace(digests, served=now))
        except StorageError as e:
            log.warn("cannot refresh the record of {cache_key}: {error}", cache_key=key, error=str(e))

    async def _stored_digests(self, key: str, tag: str) -> ImageRecord | None:
        data = await self._storage.get(records.image_key(key))
        if data is None:
            return None
        digests = ImageRecord.decode(data)
        if digests is None:
            log.warn("ignoring an unreadable cache record", cache_key=key)
            return None
        built = digests.built
        self._touched.put(key, digests.served, None)
        ttl = self._ttl_for(tag)
        if ttl is not None:
            ttl = built + ttl - self._clock.seconds()
            if ttl <= 0:
                return None
        self._cache.put(key, digests, ttl)
        return digests

    async def _load(self, digests: ImageRecord) -> ImageManifests | None:
        oci = await self._blobs.stored_manifest(digests.oci)
        docker = None if digests.docker is None else await self._blobs.stored_manifest(digests.docker)
        if oci is None or (digests.docker is not None and docker is None):
            return None
        # Both flavours name the same blobs: checking one is enough.
        if not await self._blobs.intact(oci):
            return None
        sbom = None if digests.sbom is None else await self._blobs.stored_manifest(digests.sbom)
        return ImageManifests(oci=oci, docker=docker, sbom=sbom)


def _unbuildable(failure: Failure) -> PlatformUnavailable:
    """A platform no builder serves, as a value; any other failure goes on."""
    failure.trap(PlatformUnavailable)
    error = failure.value
    assert isinstance(error, PlatformUnavailable)
    return error
