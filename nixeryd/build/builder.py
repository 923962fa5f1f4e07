"""Orchestration of one image: packages -> Nix -> layers -> blobs -> manifests.

Knows neither HTTP nor any storage SDK: it speaks to ``IStorage``, a Nix
builder, and an ``Offload`` for the blocking archive work. Caching of whole
images lives in ``nixeryd.registry.images``.
"""
from __future__ import annotations

import hashlib
from functools import partial
from typing import Awaitable, Callable, Mapping, Protocol, Sequence

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from nixeryd.build.failures import PackagesNotFound, outcome
from nixeryd.build.known import KnownPackages
from nixeryd.build.nix import NixBuildResult
from nixeryd.build.pkgsource import PackageSource
from nixeryd.core.blobs import BlobInfo, blob_info
from nixeryd.core.cache import SingleFlight, TTLCache, gather
from nixeryd.core.offload import Offload
from nixeryd.image import accounts, archive, manifest, sbom, symlinks
from nixeryd.image.layers import Layer, closure_of, group_layers, package_name
from nixeryd.image.manifest import Flavour, ImageManifests, StoredManifest
from nixeryd.image.names import ImageSpec
from nixeryd.ops.activity import Activity, BuildFailure
from nixeryd.ops.metrics import Metrics
from nixeryd.storage import records
from nixeryd.storage.blobstore import BlobStore
from nixeryd.storage.interface import DAMAGED, INTACT, IStorage, staging_failure

log = Logger()

SSL_CERT_FILE = "/etc/ssl/certs/ca-bundle.crt"


class Nix(Protocol):
    """What the builder needs of Nix (``nixeryd.build.nix.NixBuilder``)."""

    def build(
        self, source: Mapping[str, str], packages: Sequence[str], system: str, *, label: str = ""
    ) -> Awaitable[NixBuildResult]: ...

    def realise(self, paths: Sequence[str], *, label: str = "") -> Awaitable[bool]: ...


class BuildQueueFull(Exception):
    """Every build slot is busy and the queue behind them is full."""


BIG_LAYER = 8 * 1024 * 1024
"""Layers of this many bytes of store paths or more are packed by the builder's ``packing``
threads (niced: they give way to warm pulls); smaller ones, which a pull of known names
is made of, on its ordinary ones."""


def _message(error: Exception) -> str:
    message = getattr(error, "message", None)
    return message if isinstance(message, str) else f"{type(error).__name__}: {error}"


def symlink_layer_key(roots: Sequence[str], env_target: str | None, nonroot: bool = False) -> str:
    """The identity of a symlink layer: the roots it merges, /usr/bin/env, and the
    account files (with nonroot's home, when it has one)."""
    text = "symlinks\n" + "\n".join(sorted(roots)) + "\nenv:" + (env_target or "")
    files = b"".join(k.encode() + b"\0" + v for k, v in sorted(accounts.account_files(nonroot).items()))
    text += "\naccounts:" + hashlib.sha256(files).hexdigest() + f"\nhomes:{sorted(accounts.homes(nonroot).items())}"
    return hashlib.sha256(text.encode()).hexdigest()


def env_target(roots: Sequence[str]) -> str | None:
    """Where /usr/bin/env points: coreutils' env, when coreutils is in the image."""
    for root in sorted(roots):
        name = package_name(root)
        if name == "coreutils" or name.startswith("coreutils-"):
            return root + "/bin/env"
    return None


def _entrypoint(image: ImageSpec, built: NixBuildResult) -> list[str]:
    """What ``run/`` runs: the first package's ``meta.mainProgram``, by its store path."""
    assert image.first is not None
    program = built.main_programs.get(image.first)
    if not program or "/" in program:
        raise PackagesNotFound(
            f"run/: {image.first} names no main program (meta.mainProgram)", "", (image.first,),
            f"{image.first} has no meta.mainProgram, so run/ cannot know what to run; "
            "name the image without run/ and give the command to the client",
        )
    return [f"{built.named[image.first]}/bin/{program}"]


class ImageBuilder:
    """Builds images: at most ``max_builds`` Nix builds at once, ``queue`` more waiting."""

    def __init__(
        self,
        *,
        nix: Nix,
        storage: IStorage,
        offload: Offload,
        source: PackageSource,
        clock: IReactorTime,
        popularity: Mapping[str, int],
        layer_budget: int = 94,
        max_builds: int = 2,
        queue: int = 64,
        metrics: Metrics | None = None,
        compression: str = "gzip",
        activity: Activity | None = None,
        blobs: BlobStore | None = None,
        known: KnownPackages | None = None,
        packing: Offload | None = None,
    ) -> None:
        """``packing`` packs layers of ``BIG_LAYER`` bytes or more (``offload`` when not given)."""
        self._nix = nix
        self._storage = storage
        self._known = known
        self.blobs = blobs if blobs is not None else BlobStore(storage, offload)
        self._offload = offload
        self._packing = packing if packing is not None else offload
        self._source = source
        self._clock = clock
        self._popularity = popularity
        self._budget = layer_budget
        self._slots = DeferredSemaphore(max_builds)
        self._queue = queue
        self._layers: SingleFlight[BlobInfo] = SingleFlight()
        self.compression = compression
        self._metrics = metrics if metrics is not None else Metrics()
        self._metrics.watch(lambda: self.running, lambda: self.waiting)
        self.activity = activity if activity is not None else Activity()
        # Layer key -> its blob, as in builds/<key>; checked against storage before reuse.
        self._built: TTLCache[BlobInfo] = TTLCache(clock, max_entries=20_000)

    @property
    def waiting(self) -> int:
        """Builds waiting for a slot."""
        return len(self._slots.waiting)

    @property
    def running(self) -> int:
        """Nix builds running now."""
        return self._slots.limit - self._slots.tokens

    async def build(self, image: ImageSpec, tag: str, *, identity: str | None = None,
                    ttl: float | None = None) -> ImageManifests:
        """Build ``image`` from the package set at ``tag`` and store everything it is made of.
        With the package set's ``identity``, names already resolved (no longer ago than
        ``ttl``, None for a set that never changes) are taken as they resolved, without Nix."""
        if self._slots.tokens == 0 and len(self._slots.waiting) >= self._queue:
            self._metrics.builds.labels(outcome="rejected").inc()
            raise BuildQueueFull()
        started = self._clock.seconds()
        label = f"{image.name}:{tag} ({image.arch.oci})"
        number = self.activity.started(label, started)
        try:
            manifests = await self._build(image, tag, started, label, identity, ttl)
        except Exception as e:
            self._metrics.builds.labels(outcome=outcome(e)).inc()
            message = _message(e)
            self.activity.failed(BuildFailure(self._clock.seconds(), label, tag, message,
                                              getattr(e, "summary", None) or message.split("\n", 1)[0], outcome(e)))
            raise
        finally:
            self.activity.ended(number)
        self._metrics.builds.labels(outcome="built").inc()
        self._metrics.build_seconds.observe(self._clock.seconds() - started)
        return manifests

    async def _build(self, image: ImageSpec, tag: str, started: float, label: str, identity: str | None,
                     ttl: float | None) -> ImageManifests:
        # A build slot covers Nix and the packing after it: packing is CPU work, and the
        # build limit is what keeps it from crowding out everything else.
        await self._slots.acquire()
        try:
            log.info("building {image} for {arch} at {tag}", image=image.name,
                     arch=image.arch.oci, tag=tag)
            built = await self._resolved(image, tag, label, identity, ttl)
            nix_done = self._clock.seconds()
            manifests = await self._pack(image, tag, built)
        finally:
            self._slots.release()
        log.info(
            "built {image} in {seconds:.2f}s ({nix_seconds:.2f}s in Nix): {digest}",
            image=image.name,
            seconds=self._clock.seconds() - started,
            nix_seconds=nix_done - started,
            digest=manifests.oci.digest,
        )
        return manifests

    async def _resolved(self, image: ImageSpec, tag: str, label: str, identity: str | None,
                        ttl: float | None) -> NixBuildResult:
        """What the image's names stand for: from what they resolved to before, as far as
        that goes (names not known yet evaluated alone, paths this host lacks realised
        without evaluating), else from a whole Nix build."""
        source, system, names = self._source.nix_source(tag), image.arch.nix_system, image.packages
        known = self._known
        if known is None or identity is None:
            return await self._nix.build(source, names, system, label=label)
        evaluated: tuple[str, ...] = ()  # the names Nix was asked for alone
        realised = False
        while True:
            found = await known.look_up(identity, system, names, ttl)
            if found.build is not None:
                how = (f"Nix evaluated only {', '.join(evaluated)}" if evaluated
                       else "missing paths realised without evaluation" if realised else "no Nix")
                log.info("{image} made of known names: {how}", image=image.name, how=how)
                return found.build
            if found.unknown and not evaluated and len(found.unknown) < len(set(names)):
                evaluated = found.unknown
                partial = await self._nix.build(source, found.unknown, system, label=label)
                await known.remember(identity, system, partial)
            elif found.realise and not realised and not found.unknown:
                realised = True
                if not await self._nix.realise(found.realise, label=label):
                    break
            else:
                break
        built = await self._nix.build(source, names, system, label=label)
        await known.remember(identity, system, built)
        return built

    async def _pack(self, image: ImageSpec, tag: str, built: NixBuildResult) -> ImageManifests:
        base = closure_of((built.named[b] for b in image.base if b in built.named), built.closure)
        # The symlink layer takes one place of the budget.
        layers: list[Layer] = await self._offload(
            partial(group_layers, favoured=base),
            built.roots, built.closure, self._popularity, max(1, self._budget - 1),
        )
        target = env_target(built.roots)
        entrypoint = _entrypoint(image, built) if image.run else None
        infos: list[BlobInfo] = await gather(
            [self._layer(layer) for layer in layers]
            + [self._symlink_layer(built.roots, target, image.nonroot)]
        )

        config = manifest.image_config(
            image.arch,
            [i.diff_id for i in infos],
            env=["PATH=" + manifest.DEFAULT_PATH, "SSL_CERT_FILE=" + SSL_CERT_FILE],
            cmd=["bash"] if image.shell and entrypoint is None else None,
            labels=self._source.labels(tag, built.revision),
            user=accounts.NONROOT_USER if image.nonroot else None,
            entrypoint=entrypoint,
        )
        # The config, manifests and SBOM are written at once: they are only reachable once
        # the image record names them, written after every one of them is in place.
        config_info = blob_info(config)
        config_descriptor = manifest.Descriptor(config_info.digest, config_info.size)
        layer_descriptors = [manifest.Descriptor(i.digest, i.size) for i in infos]
        if self.compression == "zstd":
            bodies = [(manifest.image_manifest(Flavour.OCI, config_descriptor, layer_descriptors,
                                               layer_type=manifest.OCI_LAYER_ZSTD), Flavour.OCI.manifest_type)]
        else:
            bodies = [(manifest.image_manifest(flavour, config_descriptor, layer_descriptors), flavour.manifest_type)
                      for flavour in (Flavour.OCI, Flavour.DOCKER)]
        stored: list[StoredManifest] = [StoredManifest(blob_info(body).digest, media_type, body)
                                        for body, media_type in bodies]
        attached = await self._sbom(image, built, stored[0])
        writes: list[Deferred[object]] = [Deferred.fromCoroutine(self.blobs.put_blob(config))]
        writes += [Deferred.fromCoroutine(self.blobs.store_manifest(body, media_type)) for body, media_type in bodies]
        await gather(writes + attached[1])
        return ImageManifests(oci=stored[0], docker=stored[1] if len(stored) > 1 else None, sbom=attached[0])

    async def _sbom(self, image: ImageSpec, built: NixBuildResult,
                    subject: StoredManifest) -> tuple[StoredManifest, list[Deferred[object]]]:
        """The image's SPDX document with the artifact manifest attaching it, and the writes
        that store them."""
        meta = {built.named[name]: about for name, about in built.meta.items() if name in built.named}
        document: bytes = await self._offload(
            sbom.document, image.name, subject.digest, built.roots, built.closure, meta)
        body = sbom.artifact_manifest(document, subject.body)
        writes: list[Deferred[object]] = [
            Deferred.fromCoroutine(self.blobs.put_blob(document)),
            Deferred.fromCoroutine(self.blobs.put_blob(sbom.EMPTY)),
            Deferred.fromCoroutine(self.blobs.store_manifest(body, manifest.OCI_MANIFEST)),
        ]
        return StoredManifest(blob_info(body).digest, manifest.OCI_MANIFEST, body), writes

    def _record_key(self, key: str) -> str:
        """A layer's record key: its identity, how it is compressed, and the packing format."""
        return hashlib.sha256(f"{self.compression}:{archive.PACK_FORMAT}:{key}".encode()).hexdigest()

    def _layer(self, layer: Layer) -> Deferred[BlobInfo]:
        paths, key, compression = layer.paths, self._record_key(layer.key), self.compression
        md5 = bool(self._storage.checks_md5)
        return self._layers.run(
            key,
            lambda: self._packed(
                key, lambda out: archive.write_layer(paths, out, compression=compression, md5=md5),
                self._packing if layer.size >= BIG_LAYER else self._offload,
            ),
        )

    def _symlink_layer(self, roots: Sequence[str], target: str | None, nonroot: bool) -> Deferred[BlobInfo]:
        key = self._record_key(symlink_layer_key(roots, target, nonroot))
        files, homes, compression = accounts.account_files(nonroot), accounts.homes(nonroot), self.compression
        return self._layers.run(
            key,
            lambda: self._packed(
                key, lambda out: symlinks.write_symlink_layer(
                    roots, out, env_target=target, files=files, homes=homes, compression=compression
                )
            ),
        )

    async def _packed(self, key: str, write: Callable[..., BlobInfo], offload: Offload | None = None) -> BlobInfo:
        """A layer's blob: reused when a build record and its blob exist, else packed now."""
        known = self._built.get(key)
        if known is None:
            known = records.decode_layer(await self._storage.get(records.layer_key(key)))
        if known is not None:
            state = await self._storage.check_blob(
                known.digest.removeprefix("sha256:"), known.size, known.md5)
            if state == INTACT:
                self._built.put(key, known, None)
                return known
            if state == DAMAGED:
                log.warn("stored layer {digest} does not match its build record; packing it again",
                         layer=key, digest=known.digest)
            self._built.pop(key)
        staged = self._storage.staging_path()
        try:
            info: BlobInfo = await (offload or self._offload)(_write_to, staged, write)
            await self._storage.commit_blob(staged, info)
        except OSError as e:
            self._storage.discard(staged)
            failure = staging_failure("writing layer " + key, e, staged)
            if failure is None:
                raise  # a store path that cannot be read: a packing failure, not storage's
            raise failure from e
        except BaseException:
            self._storage.discard(staged)
            raise
        # The record is written only once its blob is in place.
        await self._storage.put(records.layer_key(key), records.encode_layer(info), records.JSON)
        self._built.put(key, info, None)
        self._metrics.packed_bytes.inc(info.size)
        log.info("packed layer {layer}: {size} bytes, {digest}",
                 layer=key, size=info.size, digest=info.digest)
        return info


def _write_to(path: str, write: Callable[..., BlobInfo]) -> BlobInfo:
    """Blocking: write an archive into ``path``; the storage makes it durable."""
    with open(path, "wb") as out:
        return write(out)
