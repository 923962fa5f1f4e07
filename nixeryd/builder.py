"""Orchestration of one image: packages -> Nix -> layers -> blobs -> manifest.

Knows neither HTTP nor any storage SDK: it speaks to ``IStorage``, a Nix
builder, and an ``Offload`` for the blocking archive work.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping, Protocol, Sequence

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from nixeryd import archive, manifest
from nixeryd.archive import BlobInfo
from nixeryd.cache import ManifestCache, SingleFlight
from nixeryd.layers import Layer, PathInfo, group_layers, package_name
from nixeryd.names import Image
from nixeryd.offload import Offload
from nixeryd.pkgsource import PackageSource
from nixeryd.storage.interface import IStorage

log = Logger()

SSL_CERT_FILE = "/etc/ssl/certs/ca-bundle.crt"


class NixBuildResult(Protocol):
    roots: tuple[str, ...]
    closure: Mapping[str, PathInfo]


class Nix(Protocol):
    """What the builder needs of Nix (``nixeryd.nix.NixBuilder``)."""

    async def build(
        self, source: Mapping[str, str], packages: Sequence[str], system: str, *, label: str = ""
    ) -> NixBuildResult: ...


@dataclass(frozen=True)
class StoredManifest:
    """A manifest as served: its bytes, digest and media type."""

    digest: str
    media_type: str
    body: bytes


def image_cache_key(image: Image, source_identity: str) -> str:
    """The identity of a build: packages, architecture and package set."""
    doc = {
        "packages": list(image.packages),
        "system": image.arch.nix_system,
        "shell": image.shell,
        "source": source_identity,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def symlink_layer_key(roots: Sequence[str], env_target: str | None) -> str:
    """The identity of a symlink layer: the roots it merges, and /usr/bin/env."""
    text = "symlinks\n" + "\n".join(sorted(roots)) + "\nenv:" + (env_target or "")
    return hashlib.sha256(text.encode()).hexdigest()


def env_target(roots: Sequence[str]) -> str | None:
    """Where /usr/bin/env points: coreutils' env, when coreutils is in the image."""
    for root in sorted(roots):
        name = package_name(root)
        if name == "coreutils" or name.startswith("coreutils-"):
            return root + "/bin/env"
    return None


def blob_key(digest: str) -> str:
    return "layers/" + digest.removeprefix("sha256:")


def _info_json(info: BlobInfo) -> bytes:
    return json.dumps(
        {"digest": info.digest, "diff_id": info.diff_id, "size": info.size, "md5": info.md5},
        sort_keys=True,
    ).encode()


def _info_from_json(data: bytes) -> BlobInfo | None:
    try:
        doc = json.loads(data)
        return BlobInfo(
            digest=str(doc["digest"]),
            diff_id=str(doc["diff_id"]),
            size=int(doc["size"]),
            md5=str(doc["md5"]),
        )
    except (ValueError, KeyError, TypeError):
        return None


class ImageBuilder:
    """Builds images and keeps track of what is built."""

    def __init__(
        self,
        *,
        nix: Nix,
        storage: IStorage,
        offload: Offload,
        source: PackageSource,
        clock: IReactorTime,
        popularity: Callable[[], Awaitable[Mapping[str, int]]],
        layer_budget: int = 94,
        cache_ttl: float = 6 * 3600,
    ) -> None:
        self._nix = nix
        self._storage = storage
        self._offload = offload
        self._source = source
        self._clock = clock
        self._popularity = popularity
        self._budget = layer_budget
        self._ttl = cache_ttl
        self._manifests = ManifestCache(clock)
        self._images: SingleFlight[StoredManifest] = SingleFlight()
        self._layers: SingleFlight[BlobInfo] = SingleFlight()

    @property
    def building(self) -> int:
        """How many images are being built now."""
        return len(self._images)

    def manifest(self, image: Image, tag: str) -> Deferred[StoredManifest]:
        """The manifest of ``image`` at ``tag``: from a cache, or built now."""
        key = image_cache_key(image, self._source.identity(tag))
        return self._images.run(key, lambda: self._cached_or_built(image, tag, key))

    async def _cached_or_built(self, image: Image, tag: str, key: str) -> StoredManifest:
        digest = self._manifests.get(key)
        if digest is None:
            digest = await self._stored_manifest_digest(key, tag)
        if digest is not None:
            stored = await self.stored_manifest(digest)
            if stored is not None:
                log.debug("manifest cache hit for {image}", image=image.name, cache_key=key)
                return stored
        return await self._build(image, tag, key)

    async def _stored_manifest_digest(self, key: str, tag: str) -> str | None:
        data = await self._storage.get("manifests/" + key)
        if data is None:
            return None
        try:
            record = json.loads(data)
            digest = str(record["digest"])
            built = float(record["built"])
        except (ValueError, KeyError, TypeError):
            log.warn("ignoring an unreadable cache record", cache_key=key)
            return None
        ttl = self._ttl_for(tag)
        if ttl is not None:
            remaining = built + ttl - self._clock.seconds()
            if remaining <= 0:
                return None
            self._manifests.put(key, digest, remaining)
        else:
            self._manifests.put(key, digest, None)
        return digest

    def _ttl_for(self, tag: str) -> float | None:
        return None if self._source.pinned(tag) else self._ttl

    async def stored_manifest(self, digest: str) -> StoredManifest | None:
        """A manifest stored under its digest, or None when there is none."""
        body = await self._storage.get(blob_key(digest))
        if body is None:
            return None
        try:
            media_type = manifest.manifest_media_type(body)
        except ValueError:
            return None
        return StoredManifest(digest=digest, media_type=media_type, body=body)

    async def _build(self, image: Image, tag: str, key: str) -> StoredManifest:
        started = self._clock.seconds()
        log.info("building {image} at {tag}", image=image.name, tag=tag, cache_key=key)
        built = await self._nix.build(
            self._source.nix_source(tag), image.packages, image.arch.nix_system, label=image.name
        )
        nix_done = self._clock.seconds()
        popularity = await self._popularity()
        # The symlink layer takes one place of the budget.
        layers: list[Layer] = await self._offload(
            group_layers, built.roots, built.closure, popularity, max(1, self._budget - 1)
        )
        target = env_target(built.roots)
        store_layers = gatherResults(
            [self._layer(layer) for layer in layers], consumeErrors=True
        )
        symlinks = self._symlink_layer(built.roots, target)
        infos: list[BlobInfo] = await store_layers
        infos.append(await symlinks)

        cmd = ["bash"] if image.shell else None
        env = ["PATH=/bin", "SSL_CERT_FILE=" + SSL_CERT_FILE]
        config = manifest.image_config(
            image.arch, [i.diff_id for i in infos], env=env, cmd=cmd
        )
        config_info = await self._put_blob(config)
        body = manifest.image_manifest(
            manifest.Flavour.OCI,
            manifest.Descriptor(config_info.digest, config_info.size),
            [manifest.Descriptor(i.digest, i.size) for i in infos],
        )
        manifest_info = await self._put_blob(body)
        record = json.dumps({"digest": manifest_info.digest, "built": self._clock.seconds()})
        await self._storage.put("manifests/" + key, record.encode(), "application/json")
        self._manifests.put(key, manifest_info.digest, self._ttl_for(tag))
        log.info(
            "built {image} in {seconds:.1f}s ({nix_seconds:.1f}s in Nix), {count} layers, {digest}",
            image=image.name,
            seconds=self._clock.seconds() - started,
            nix_seconds=nix_done - started,
            count=len(infos),
            digest=manifest_info.digest,
            cache_key=key,
        )
        return StoredManifest(
            digest=manifest_info.digest,
            media_type=manifest.Flavour.OCI.manifest_type,
            body=body,
        )

    async def _put_blob(self, data: bytes) -> BlobInfo:
        info: BlobInfo = await self._offload(archive.blob_info, data)
        await self._storage.put(blob_key(info.digest), data, "application/octet-stream")
        return info

    def _layer(self, layer: Layer) -> Deferred[BlobInfo]:
        paths = layer.paths
        return self._layers.run(
            layer.key,
            lambda: self._packed(layer.key, lambda out: archive.write_layer(paths, out)),
        )

    def _symlink_layer(self, roots: Sequence[str], target: str | None) -> Deferred[BlobInfo]:
        key = symlink_layer_key(roots, target)
        return self._layers.run(
            key,
            lambda: self._packed(
                key, lambda out: archive.write_symlink_layer(roots, out, env_target=target)
            ),
        )

    async def _packed(self, key: str, write: Callable[..., BlobInfo]) -> BlobInfo:
        """A layer's blob: reused when a build record and its blob exist, else packed now."""
        record = await self._storage.get("builds/" + key)
        if record is not None:
            known = _info_from_json(record)
            if known is not None and await self._storage.has(blob_key(known.digest)):
                return known
        staged = self._storage.staging_path()
        try:
            info: BlobInfo = await self._offload(_write_to, staged, write)
            await self._storage.commit_blob(staged, info)
        except BaseException:
            self._storage.discard(staged)
            raise
        # The record is written only once its blob is in place.
        await self._storage.put("builds/" + key, _info_json(info), "application/json")
        log.info("packed layer {layer}: {size} bytes, {digest}", layer=key, size=info.size, digest=info.digest)
        return info


def _write_to(path: str, write: Callable[..., BlobInfo]) -> BlobInfo:
    """Blocking: write an archive into ``path``; the storage makes it durable."""
    with open(path, "wb") as out:
        return write(out)
