"""Media types, image configs and image manifests, as deterministic bytes.

Pure: no I/O, no Twisted. JSON is written with sorted keys and compact
separators, and the config's only time is a fixed one (``CREATED``), so the
same image gives the same bytes (and digests) on every machine. The config blob is the same for both
manifest flavours; only the media types in the manifest's descriptors differ.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from nixeryd.image.names import Arch

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

"""The media types of single-image manifests."""
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
"""The media types of multi-platform indexes."""
ENTRY_TYPE = {OCI_INDEX: OCI_MANIFEST, DOCKER_MANIFEST_LIST: DOCKER_MANIFEST}
"""The media type of the manifests each kind of index lists."""
CREATED = "1970-01-01T00:00:01Z"
"""The creation time of every image: fixed, so that digests are too; clients show it."""
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""PATH as other images have it: derived images put tools in the usual places."""
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
"""No manifest or index nixeryd writes comes near this; larger blobs are layers."""


@dataclass(frozen=True)
class Descriptor:
    """A blob referenced from a manifest; its media type follows from the flavour."""

    digest: str  # "sha256:<hex>"
    size: int


class Flavour(enum.Enum):
    """Which family of media types a manifest is written with."""

    OCI = (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER, OCI_INDEX)
    DOCKER = (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER, DOCKER_MANIFEST_LIST)

    @property
    def manifest_type(self) -> str:
        return self.value[0]

    @property
    def config_type(self) -> str:
        return self.value[1]

    @property
    def layer_type(self) -> str:
        return self.value[2]

    @property
    def index_type(self) -> str:
        return self.value[3]


@dataclass(frozen=True)
class StoredManifest:
    """A manifest or index as served: its bytes, digest and media type."""

    digest: str
    media_type: str
    body: bytes


@dataclass(frozen=True)
class ImageManifests:
    """One image (or multi-platform index) in both flavours; Docker's is absent when the
    layers are compressed in a way Docker schema 2 cannot name (zstd)."""

    oci: StoredManifest
    docker: StoredManifest | None
    sbom: StoredManifest | None = None  # the SPDX artifact whose subject is ``oci``
    # An index without the platforms no builder can build now: served, never kept for long.
    missing: tuple[str, ...] = ()

    def flavour(self, flavour: Flavour) -> StoredManifest | None:
        return self.oci if flavour is Flavour.OCI else self.docker


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def image_config(
    arch: Arch,
    diff_ids: Sequence[str],
    *,
    env: Sequence[str],
    cmd: Sequence[str] | None,
    labels: Mapping[str, str] | None = None,
    user: str | None = None,
    entrypoint: Sequence[str] | None = None,
) -> bytes:
    """The image configuration blob: platform, layers' diffIDs (in order), Env, Cmd
    and labels, created at the fixed time ``CREATED``."""
    container: dict[str, Any] = {"Env": list(env)}
    if entrypoint is not None:
        container["Entrypoint"] = list(entrypoint)
    if cmd is not None:
        container["Cmd"] = list(cmd)
    if user is not None:
        container["User"] = user
    if labels:
        container["Labels"] = dict(labels)
    return _dump(
        {
            "architecture": arch.oci,
            "created": CREATED,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "config": container,
        }
    )


def image_manifest(
    flavour: Flavour, config: Descriptor, layers: Sequence[Descriptor], *, layer_type: str | None = None
) -> bytes:
    """A schema 2 image manifest naming ``config`` and ``layers`` with ``flavour``'s media types
    (``layer_type`` for layers compressed otherwise than with gzip)."""
    return _dump(
        {
            "schemaVersion": 2,
            "mediaType": flavour.manifest_type,
            "config": _descriptor(flavour.config_type, config),
            "layers": [_descriptor(layer_type or flavour.layer_type, layer) for layer in layers],
        }
    )


def image_index(flavour: Flavour, manifests: Sequence[tuple[Descriptor, Arch]]) -> bytes:
    """A multi-platform index (OCI) or manifest list (Docker) of per-platform manifests."""
    return _dump(
        {
            "schemaVersion": 2,
            "mediaType": flavour.index_type,
            "manifests": [
                {
                    **_descriptor(flavour.manifest_type, descriptor),
                    "platform": {"architecture": arch.oci, "os": "linux"},
                }
                for descriptor, arch in manifests
            ],
        }
    )


def _descriptor(media_type: str, descriptor: Descriptor) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": descriptor.digest, "size": descriptor.size}


def manifest_media_type(body: bytes) -> str:
    """The ``mediaType`` of a stored manifest body; ``ValueError`` when it has none."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"manifest is not JSON: {e}") from None
    media_type = doc.get("mediaType") if isinstance(doc, dict) else None
    if not isinstance(media_type, str) or not media_type:
        raise ValueError("manifest has no mediaType")
    return media_type
