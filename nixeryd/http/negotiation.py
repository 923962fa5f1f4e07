"""Content negotiation: which manifest a client takes, conditional requests, and the
manifest response both ways to it share (the route and ``warm``)."""
from __future__ import annotations

from twisted.web.iweb import IRequest

from nixeryd.image import manifest
from nixeryd.image.manifest import ImageManifests, StoredManifest
from nixeryd.ops.metrics import Metrics

API_VERSION_HEADER = (b"Docker-Distribution-API-Version", b"registry/2.0")


def accepted_types(request: IRequest) -> set[str]:
    """Every media type of every Accept header line (clients send one per line)."""
    types = set()
    for line in request.requestHeaders.getRawHeaders(b"accept") or []:
        for part in line.split(b","):
            media_type = part.split(b";", 1)[0].strip().lower().decode("latin-1")
            if media_type:
                types.add(media_type)
    return types


def usable(media_type: str, accepted: set[str]) -> bool:
    """Whether a client that sent ``accepted`` can read a manifest of this type, and, for an
    index, the manifests it lists (Docker's CLI takes an OCI index but no OCI manifest)."""
    wanted = {media_type, manifest.ENTRY_TYPE.get(media_type, media_type)}
    return not accepted or "*/*" in accepted or wanted <= accepted


def choose(manifests: ImageManifests, accepted: set[str]) -> StoredManifest | None:
    """OCI unless the client takes only Docker's types; None when it takes neither."""
    if usable(manifests.oci.media_type, accepted):
        return manifests.oci
    if manifests.docker is not None and usable(manifests.docker.media_type, accepted):
        return manifests.docker
    return None


def takes_index(accepted: set[str]) -> bool:
    return any(usable(media_type, accepted) for media_type in manifest.INDEX_TYPES)


def not_modified(request: IRequest, digest: str) -> bool:
    """Whether If-None-Match names this digest (quoted or not) or ``*``."""
    for line in request.requestHeaders.getRawHeaders(b"if-none-match") or []:
        for tag in line.split(b","):
            value = tag.strip().removeprefix(b"W/").strip(b'"').decode("latin-1")
            if value in (digest, "*"):
                return True
    return False


def host_of(request: IRequest) -> str:
    """The host the client named, for pull commands and signed identities."""
    return (request.getHeader(b"host") or b"localhost").decode("latin-1")


def arg_of(request: IRequest, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[0].decode("utf-8", "replace") if values else None


def send_manifest(request: IRequest, stored: StoredManifest, metrics: Metrics) -> bytes:
    """Answer with ``stored``: its digest, ETag and type; 304 when If-None-Match names it,
    else its bytes (counted as served when a GET sends them)."""
    request.setHeader(b"Docker-Content-Digest", stored.digest.encode())
    request.setHeader(b"ETag", f'"{stored.digest}"'.encode())
    request.setHeader(b"Content-Type", stored.media_type.encode())
    if not_modified(request, stored.digest):
        request.setResponseCode(304)
        return b""
    request.setHeader(b"Content-Length", str(len(stored.body)).encode())
    if request.method == b"GET":
        metrics.served_bytes.inc(len(stored.body))
    return stored.body
