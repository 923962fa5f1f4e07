"""Every storage key and every record's shape, in one place: the builder, the registry,
gc and verify all read and write through here. Pure: no I/O, no Twisted.

The layout, shared by every backend so that one bucket serves a fleet:

- ``layers/<sha256 hex>``: every blob (layers, configs, manifests, SBOMs, signatures).
  The prefix was named when only layers were stored; it stays, so stored data stays
  valid across versions.
- ``manifests/<cache key>``: an image record (``ImageRecord``): the manifests built for a
  cache key, when, and when last served.
- ``builds/<layer key>``: a layer record (``encode_layer``): the blob packed for a layer.
- ``tags/<sha256 of a canonical name>``: a tag record (``TagRecord``).
- ``leases/<cache key>``: a build lease or a failure (``LeaseRecord``).
- ``resolved/<sha256 of package set, system and name>``: what a package name resolved to
  (``Resolution``), so that images of known names are made without Nix.

Keys are a prefix and exactly 64 lowercase hex characters (``check_key``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from nixeryd.core.blobs import SHA256, BlobInfo, hex_of

BLOBS = "layers"
IMAGES = "manifests"
LAYERS = "builds"
TAGS = "tags"
LEASES = "leases"
RESOLVED = "resolved"
PREFIXES = (BLOBS, IMAGES, LAYERS, TAGS, LEASES, RESOLVED)
JSON = "application/json"

TOUCH_INTERVAL = 3600.0
"""Most seconds a record's served time (of an image, of a tag) lags behind its last serving:
instances refresh it no more often, and garbage collection allows for it."""



def blob_key(digest: str) -> str:
    """The key of the blob ``digest`` (``sha256:<hex>``, or the hex alone)."""
    return f"{BLOBS}/{digest.removeprefix(SHA256)}"


def is_blob_key(key: str) -> bool:
    return key.startswith(BLOBS + "/")


def image_key(cache_key: str) -> str:
    return f"{IMAGES}/{cache_key}"


def layer_key(layer: str) -> str:
    return f"{LAYERS}/{layer}"


def tag_key(name: str) -> str:
    return f"{TAGS}/{hashlib.sha256(name.encode()).hexdigest()}"


def lease_key(cache_key: str) -> str:
    return f"{LEASES}/{cache_key}"


def resolved_key(identity: str, system: str, name: str) -> str:
    return f"{RESOLVED}/{hashlib.sha256(json.dumps([identity, system, name]).encode()).hexdigest()}"


def hex_of_key(key: str) -> str:
    """The 64 hex characters after a key's prefix."""
    return key.rsplit("/", 1)[1]


@dataclass(frozen=True)
class ImageRecord:
    """What ``manifests/<cache key>`` holds: the image's manifests by digest (OCI, Docker,
    and its SBOM's artifact manifest), when it was built and when last served."""

    oci: str
    docker: str | None
    built: float
    served: float
    sbom: str | None = None

    def encode(self) -> bytes:
        return json.dumps({"built": self.built, "served": self.served, "oci": self.oci,
                           "docker": self.docker, "sbom": self.sbom}).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> ImageRecord | None:
        """The record, or None when it is not one (unreadable, or a field of the wrong type)."""
        try:
            doc = json.loads(data or b"")
            built = float(doc["built"])
            docker, sbom = doc.get("docker"), doc.get("sbom")
            return cls(oci=str(doc["oci"]), docker=None if docker is None else str(docker), built=built,
                       served=float(doc.get("served", built)), sbom=None if sbom is None else str(sbom))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @property
    def last_used(self) -> float:
        return max(self.built, self.served)

    def manifests(self) -> list[str | None]:
        """The hex of each manifest the image needs (OCI, Docker if any); None for a digest
        that is not well formed."""
        return [hex_of(self.oci)] + ([hex_of(self.docker)] if self.docker is not None else [])

    def roots(self) -> list[str]:
        """The hex of every well-formed manifest named, the SBOM's included."""
        return [h for h in (hex_of(self.oci), hex_of(self.docker), hex_of(self.sbom)) if h]


def encode_layer(info: BlobInfo) -> bytes:
    """A layer record: the blob packed for a layer."""
    return json.dumps(
        {"digest": info.digest, "diff_id": info.diff_id, "size": info.size, "md5": info.md5},
        sort_keys=True,
    ).encode()


def decode_layer(data: bytes | None) -> BlobInfo | None:
    try:
        doc = json.loads(data or b"")
        return BlobInfo(digest=str(doc["digest"]), diff_id=str(doc["diff_id"]), size=int(doc["size"]),
                        md5=None if doc["md5"] is None else str(doc["md5"]))
    except (ValueError, KeyError, TypeError):
        return None


def layer_record_blob(data: bytes | None) -> tuple[str | None, object]:
    """The hex of the blob a layer record names (None if it names none) and the size it
    gives, read leniently, for gc and verify."""
    try:
        doc = json.loads(data or b"")
        return hex_of(doc.get("digest")), doc.get("size")
    except (ValueError, AttributeError):
        return None, None


@dataclass(frozen=True)
class TagRecord:
    """What ``tags/<key>`` holds: a repository's tags, each with when it was last served.
    A record written before tags had served times (a list) reads as served when the
    record was last written (``modified``)."""

    name: str
    served: dict[str, float]

    def encode(self) -> bytes:
        return json.dumps({"name": self.name, "served": self.served}, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes | None, modified: float = 0.0) -> TagRecord | None:
        try:
            doc = json.loads(data or b"")
            name = doc["name"]
            if not isinstance(name, str):
                return None
            if isinstance(doc.get("served"), dict):
                served = {str(t): float(s) for t, s in doc["served"].items()}
            elif isinstance(doc.get("tags"), list) and all(isinstance(t, str) for t in doc["tags"]):
                served = {t: modified for t in doc["tags"]}
            else:
                return None
            return cls(name, served)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def with_tag(self, tag: str, now: float, most: int) -> TagRecord:
        """This record with ``tag`` served ``now``, keeping the ``most`` served last."""
        served = dict(self.served)
        served[tag] = now
        if len(served) > most:
            served = dict(sorted(served.items(), key=lambda item: (item[1], item[0]))[-most:])
        return TagRecord(self.name, served)


@dataclass(frozen=True)
class LeaseRecord:
    """What ``leases/<key>`` holds: who builds the image and until when, or how its build
    failed (``failure``: see ``nixeryd.build.failures.failure_record``)."""

    state: str  # "building" or "failed"
    holder: str
    expires: float  # seconds since the epoch, by the holder's clock
    failure: dict[str, Any] | None = None
    ttl: float = 0.0  # the period it was written for; renewed every third of it

    def encode(self) -> bytes:
        doc: dict[str, Any] = {"state": self.state, "holder": self.holder, "expires": self.expires,
                               "ttl": self.ttl}
        if self.failure is not None:
            doc["failure"] = self.failure
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord | None:
        try:
            doc = json.loads(data)
            state = str(doc["state"])
            if state not in ("building", "failed"):
                return None
            failure = doc.get("failure")
            return cls(state, str(doc["holder"]), float(doc["expires"]),
                       failure if isinstance(failure, dict) else None, float(doc.get("ttl") or 0.0))
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class Resolution:
    """What ``resolved/<key>`` holds: what one package name of one package set (its
    identity) resolved to for one system, as Nix told it: the default output, its runtime
    closure (each path's references and NAR size), its main program, licence and homepage,
    the package set's revision, and when it was recorded."""

    identity: str
    system: str
    name: str
    out: str
    closure: dict[str, tuple[tuple[str, ...], int]]  # path -> (references, NAR size)
    program: str | None
    meta: dict[str, str]
    revision: str | None
    recorded: float
    deriver: str | None = None  # the derivation of ``out``, to build it again without Nix's evaluation

    def encode(self) -> bytes:
        return json.dumps({
            "identity": self.identity, "system": self.system, "name": self.name, "out": self.out,
            "closure": {path: [list(refs), size] for path, (refs, size) in sorted(self.closure.items())},
            "program": self.program, "meta": self.meta, "revision": self.revision, "recorded": self.recorded,
            "deriver": self.deriver,
        }, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> Resolution | None:
        """The record, every field checked for its type, or None."""
        try:
            doc = json.loads(data or b"")
            closure = {}
            for path, (refs, size) in doc["closure"].items():
                if not (isinstance(path, str) and isinstance(size, int) and isinstance(refs, list)
                        and all(isinstance(r, str) for r in refs)):
                    return None
                closure[path] = (tuple(refs), size)
            program, revision, meta = doc["program"], doc["revision"], doc["meta"]
            deriver = doc.get("deriver")  # not in records written before it was kept
            if not (isinstance(program, (str, type(None))) and isinstance(revision, (str, type(None)))
                    and isinstance(deriver, (str, type(None)))
                    and isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
                return None
            resolution = cls(str(doc["identity"]), str(doc["system"]), str(doc["name"]), str(doc["out"]),
                             closure, program, {str(k): v for k, v in meta.items()}, revision,
                             float(doc["recorded"]), deriver)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return resolution if resolution.out in resolution.closure else None
