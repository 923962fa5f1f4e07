"""The registry's HTTP API: the pull side of the OCI distribution spec.

Knows HTTP, not Nix: images come from ``Images``, blobs from an ``IStorage``.
Every error a client can see is the spec's JSON.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence, TypeVar
from urllib.parse import quote

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import static
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from nixeryd.http.auth import AuthBusy, Authenticator
from nixeryd.http.errors import (
    RegistryError,
    as_registry_errors,
    no_endpoint,
    storage_call,
    unsupported,
)
from nixeryd.http.imagepage import ImagePages
from nixeryd.http.imagepage import render as render_page
from nixeryd.http.index import Status, render_index
from nixeryd.http.look import error_page, wants_html
from nixeryd.http.sendfile import SendfileProducer, can_sendfile
from nixeryd.image import manifest, sbom
from nixeryd.image.manifest import ImageManifests, StoredManifest
from nixeryd.image.names import (
    Digest,
    DigestInvalid,
    NameInvalid,
    ReferenceInvalid,
    parse_digest,
    parse_name,
    parse_reference,
)
from nixeryd.ops.metrics import Metrics
from nixeryd.registry.images import Images
from nixeryd.registry.signatures import Signatures
from nixeryd.storage.interface import InMemory, IStorage, LocalFile, Redirect

log = Logger()

T = TypeVar("T")

API_VERSION_HEADER = (b"Docker-Distribution-API-Version", b"registry/2.0")
READ_METHODS = ["GET", "HEAD"]
WRITE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]
TAGS_SUFFIX = "/tags/list"


def _set(request: IRequest, name: str, value: str | int) -> None:
    request.setHeader(name.encode(), str(value).encode())


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


class RegistryAPI:
    """The Klein application serving /v2/."""

    app = Klein()

    def __init__(
        self,
        images: Images,
        storage: IStorage,
        base_packages: Sequence[str],
        *,
        metrics: Metrics | None = None,
        status: Status | None = None,
        auth: Authenticator | None = None,
        signatures: Signatures | None = None,
        pages: ImagePages | None = None,
    ) -> None:
        self._images = images
        self._signatures = signatures
        self._pages = pages
        self._storage = storage
        self._base_packages = tuple(base_packages)
        self._metrics = metrics if metrics is not None else Metrics()
        self._status = status
        self._auth = auth

    @app.route("/", methods=READ_METHODS)
    async def index(self, request: IRequest) -> bytes:
        if self._status is None:
            raise no_endpoint("/")
        try:
            full = await self._allowed(request)
        except AuthBusy:
            full = False
        body = await render_index(self._status, _host(request), secure=request.isSecure(), full=full)
        _set(request, "Content-Type", "text/html; charset=utf-8")
        _set(request, "Content-Length", len(body))
        return body

    @app.route("/image/<path:name>", methods=READ_METHODS)
    async def image_page(self, request: IRequest, name: str) -> bytes:
        """What an image holds, as HTML, or JSON for ``Accept: application/json``."""
        if self._pages is None:
            raise no_endpoint("/image/" + name)
        await self._authorize(request)
        try:
            image = parse_name(name, self._base_packages)
        except NameInvalid as e:
            raise RegistryError(400, "NAME_INVALID", str(e), {"name": name}) from None
        manifests = await as_registry_errors(image.name, self._images.manifests(image, "latest", index=False))
        data = await storage_call(Deferred.fromCoroutine(
            self._pages.data(image, manifests, _host(request), request.isSecure())))
        if "application/json" in accepted_types(request):
            return self._json(request, data)
        body = render_page(data)
        _set(request, "Content-Type", "text/html; charset=utf-8")
        _set(request, "Content-Length", len(body))
        return body

    @app.route("/healthz", methods=READ_METHODS)
    def healthz(self, request: IRequest) -> bytes:
        _set(request, "Content-Type", "text/plain; charset=utf-8")
        return b"ok\n"

    @app.route("/metrics", methods=READ_METHODS)
    def metrics(self, request: IRequest) -> bytes:
        # Rendered here rather than by prometheus_client's Twisted resource, which
        # renders in a thread: one small registry takes microseconds.
        body: bytes = generate_latest(self._metrics.registry)
        _set(request, "Content-Type", CONTENT_TYPE_LATEST)
        _set(request, "Content-Length", len(body))
        return body

    @app.handle_errors(RegistryError)
    def _registry_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, RegistryError)
        return self._error_response(request, error)

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        if error.code == 405:
            return self._error_response(request, unsupported())
        return self._error_response(request, no_endpoint(request.path.decode("utf-8", "replace")))

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("unexpected error answering {uri}", failure, uri=request.uri)
        return self._error_response(
            request, RegistryError(500, "UNKNOWN", "internal error; see the registry's log")
        )

    def _error_response(self, request: IRequest, error: RegistryError) -> bytes:
        body = error.body()
        content_type = "application/json"
        if not request.path.startswith(b"/v2") and wants_html(accepted_types(request)):
            # A person's browser on a page: the error as a page, with the way back.
            body = error_page(error.status, error.message)
            content_type = "text/html; charset=utf-8"
        request.setResponseCode(error.status, error.phrase())
        request.setHeader(*API_VERSION_HEADER)
        for name in (b"Docker-Content-Digest", b"ETag", b"Content-Range"):
            request.responseHeaders.removeHeader(name)
        _set(request, "Content-Type", content_type)
        _set(request, "Content-Length", len(body))
        if error.retry_after is not None:
            _set(request, "Retry-After", error.retry_after)
        return body

    @app.route("/v2/", methods=READ_METHODS)
    async def base(self, request: IRequest) -> bytes:
        await self._authorize(request)
        return self._json(request, {})

    async def _allowed(self, request: IRequest) -> bool:
        """Whether access control lets the request in (always, when it is off); raises
        ``AuthBusy`` when too many password checks are under way."""
        if self._auth is None:
            return True
        return bool(await self._auth.check(request.getHeader(b"authorization")))

    async def _authorize(self, request: IRequest) -> None:
        """401 with the spec's challenge unless access control lets the request in."""
        try:
            allowed = await self._allowed(request)
        except AuthBusy:
            raise RegistryError(429, "TOOMANYREQUESTS", "too many logins are being checked; try again shortly",
                                retry_after=1) from None
        if allowed or self._auth is None:
            return
        for challenge in self._auth.challenges():
            request.responseHeaders.addRawHeader(b"WWW-Authenticate", challenge.encode())
        raise RegistryError(401, "UNAUTHORIZED", "authentication required")

    @app.route("/v2/", methods=WRITE_METHODS)
    def base_write(self, request: IRequest) -> bytes:
        raise unsupported()

    @app.route("/v2/<path:rest>", methods=WRITE_METHODS)
    def write(self, request: IRequest, rest: str) -> bytes:
        raise unsupported()

    @app.route("/v2/<path:rest>", methods=READ_METHODS)
    async def read(self, request: IRequest, rest: str) -> Any:
        request.setHeader(*API_VERSION_HEADER)
        await self._authorize(request)
        if rest == "_catalog":
            every = await storage_call(Deferred.fromCoroutine(self._images.catalogue()))
            names = self._page(request, every, "/v2/_catalog", default=CATALOG_PAGE)
            return self._json(request, {"repositories": names})
        if rest.endswith(TAGS_SUFFIX):
            name = rest[: -len(TAGS_SUFFIX)]
            spelling = self._image_name(name)
            stored_tags = await storage_call(Deferred.fromCoroutine(self._images.tag_records.tags(spelling)))
            tags = sorted({"latest", *stored_tags, *self._images.known.tags(spelling)})
            page = self._page(request, tags, f"/v2/{name}/tags/list")
            return self._json(request, {"name": name, "tags": page})
        name, kind, ref = _split(rest)
        if kind == "manifests":
            return await self._manifest(request, name, ref)
        if kind == "referrers":
            return await self._referrers(request, name, ref)
        return await self._blob(request, name, ref)

    async def _referrers(self, request: IRequest, name: str, ref: str) -> bytes:
        """OCI distribution 1.1's referrers API: what is attached to a manifest (its SBOM,
        and its signature when images are signed), filtered by ``?artifactType=``."""
        try:
            image = parse_name(name, self._base_packages)
            digest = parse_digest(ref)
        except NameInvalid as e:
            raise RegistryError(400, "NAME_INVALID", str(e), {"name": name}) from None
        except DigestInvalid as e:
            raise RegistryError(400, "DIGEST_INVALID", str(e), {"digest": ref}) from None
        attached = await storage_call(Deferred.fromCoroutine(self._images.referrers_of(image, digest.digest)))
        entries = [(stored.body, sbom.SPDX_TYPE) for stored in attached]
        if entries and self._signatures is not None:
            signed = await storage_call(Deferred.fromCoroutine(
                self._signatures.signature(image, digest.hex, _host(request))))
            if signed is not None:
                entries.append((signed.body, SIGNATURE_ARTIFACT))
        wanted = _arg(request, b"artifactType")
        if wanted is not None:
            entries = [entry for entry in entries if entry[1] == wanted]
            _set(request, "OCI-Filters-Applied", "artifactType")
        body = sbom.referrers_index(entries)
        _set(request, "Content-Type", sbom.OCI_INDEX)
        _set(request, "Content-Length", len(body))
        return body

    def _json(self, request: IRequest, doc: Any) -> bytes:
        body = json.dumps(doc).encode()
        request.setHeader(*API_VERSION_HEADER)
        _set(request, "Content-Type", "application/json")
        _set(request, "Content-Length", len(body))
        return body

    def _page(self, request: IRequest, items: list[str], path: str, default: int | None = None) -> list[str]:
        """The spec's pagination: ``last`` excludes up to it, ``n`` bounds the count (at most
        ``MAX_PAGE``; ``default`` when not given); a malformed ``n`` is a 400, as in
        distribution."""
        last = _arg(request, b"last")
        if last is not None:
            items = [i for i in items if i > last]
        raw_n = _arg(request, b"n") or None  # an empty n is no n
        if raw_n is not None and (not PAGE_SIZE.fullmatch(raw_n) or int(raw_n) > MAX_PAGE):
            raise RegistryError(400, "PAGINATION_NUMBER_INVALID",
                                f"n must be a whole number from 0 to {MAX_PAGE}", {"n": raw_n[:64]})
        n = int(raw_n) if raw_n is not None else default
        if n is not None:
            if len(items) > n:
                items = items[:n]
                if items:
                    link = f'<{path}?n={n}&last={quote(items[-1])}>; rel="next"'
                    _set(request, "Link", link)
        return items

    def _image_name(self, name: str) -> str:
        """The canonical spelling of a valid ``name``, which its tags are recorded under."""
        try:
            return parse_name(name, ()).spelling
        except NameInvalid as e:
            raise RegistryError(400, "NAME_INVALID", str(e), {"name": name}) from None

    async def _manifest(self, request: IRequest, name: str, ref: str) -> bytes:
        try:
            image = parse_name(name, self._base_packages)
            reference = parse_reference(ref)
        except NameInvalid as e:
            raise RegistryError(400, "NAME_INVALID", str(e), {"name": name}) from None
        except DigestInvalid as e:
            raise RegistryError(400, "DIGEST_INVALID", str(e), {"digest": ref}) from None
        except ReferenceInvalid as e:
            raise RegistryError(404, "MANIFEST_UNKNOWN", str(e), {"reference": ref}) from None
        if isinstance(reference, Digest):
            stored = await storage_call(self._images.stored_manifest(reference.digest))
            if stored is None:
                raise RegistryError(
                    404, "MANIFEST_UNKNOWN", "no manifest with this digest", {"digest": ref}
                )
        elif SIGNATURE_TAG.fullmatch(reference.value):
            # cosign's and containers/image's lookups of a signature, attestation or SBOM:
            # never an image to build.
            signed = None
            if self._signatures is not None and reference.value.endswith(".sig"):
                signed = await storage_call(Deferred.fromCoroutine(
                    self._signatures.signature(image, reference.value[7:71], _host(request))))
            if signed is None:
                raise RegistryError(404, "MANIFEST_UNKNOWN", "no signature or attachment is stored for this image",
                                    {"tag": reference.value})
            stored = signed
        else:
            accepted = accepted_types(request)
            manifests = await as_registry_errors(
                image.name, self._images.manifests(image, reference.value, index=takes_index(accepted))
            )
            chosen = choose(manifests, accepted)
            if chosen is None:
                raise RegistryError(
                    404,
                    "MANIFEST_UNKNOWN",
                    "the manifest exists only in media types the client does not accept",
                    {"available": [m.media_type for m in (manifests.oci, manifests.docker) if m]},
                )
            stored = chosen
        return self._send_manifest(request, stored)

    def _send_manifest(self, request: IRequest, stored: StoredManifest) -> bytes:
        _set(request, "Docker-Content-Digest", stored.digest)
        _set(request, "ETag", f'"{stored.digest}"')
        _set(request, "Content-Type", stored.media_type)
        if not_modified(request, stored.digest):
            request.setResponseCode(304)
            return b""
        _set(request, "Content-Length", len(stored.body))
        self._served(request, len(stored.body))
        return stored.body

    async def _blob(self, request: IRequest, name: str, ref: str) -> Any:
        try:
            parse_name(name, ())
            digest = parse_digest(ref)
        except NameInvalid as e:
            raise RegistryError(400, "NAME_INVALID", str(e), {"name": name}) from None
        except DigestInvalid as e:
            raise RegistryError(400, "DIGEST_INVALID", str(e), {"digest": ref}) from None
        location = await storage_call(self._storage.locate_blob(digest.hex))
        if location is None:
            if self._images.expected_size(digest.digest) is not None:
                # A manifest served here names it: removed or damaged since. The manifests
                # held in memory are checked against storage again at their next pull.
                self._images.blob_damaged(digest.digest)
                raise RegistryError(404, "BLOB_UNKNOWN", "blob is missing or damaged in storage; pull the "
                                    "image again to have it rebuilt", {"digest": ref})
            raise RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": ref})
        size = len(location.data) if isinstance(location, InMemory) else location.size
        expected = self._images.expected_size(digest.digest)
        if expected is not None and size is not None and expected != size:
            self._images.blob_damaged(digest.digest)
            raise RegistryError(404, "BLOB_UNKNOWN", "blob is damaged in storage; pull the image "
                                "again to have it rebuilt", {"digest": ref})
        _set(request, "Docker-Content-Digest", digest.digest)
        _set(request, "ETag", f'"{digest.digest}"')
        if isinstance(location, Redirect):
            request.setResponseCode(307)
            request.setHeader(b"Location", location.url.encode())
            _set(request, "Content-Length", 0)
            return b""
        if not_modified(request, digest.digest):
            request.setResponseCode(304)
            return b""
        if isinstance(location, InMemory):
            _set(request, "Content-Type", "application/octet-stream")
            _set(request, "Content-Length", len(location.data))
            self._served(request, len(location.data))
            return location.data
        assert isinstance(location, LocalFile)
        answer = range_answer(request.getHeader(b"range"), location.size)
        if answer == NONE:
            _set(request, "Content-Range", f"bytes */{location.size}")
            request.setResponseCode(416)
            _set(request, "Content-Length", 0)
            return b""
        if answer == WHOLE:
            # Ranges adding up to more than the blob are an attack or a confused client.
            request.requestHeaders.removeHeader(b"range")
        if request.getHeader(b"range") is None:
            self._served(request, location.size)
            if request.method == b"GET" and location.size > 0 and can_sendfile(request):
                _set(request, "Content-Type", "application/octet-stream")
                _set(request, "Content-Length", location.size)
                _set(request, "Accept-Ranges", "bytes")
                return await SendfileProducer(request, location.path, location.size).start()
        return _blob_file(location.path)

    def _served(self, request: IRequest, size: int) -> None:
        if request.method == b"GET":
            self._metrics.served_bytes.inc(size)


SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
"""The artifact type a signature is listed with among an image's referrers."""
SIGNATURE_TAG = re.compile(r"sha256-[0-9a-f]{64}\.(sig|att|sbom)")
"""Tags sigstore clients look signatures and attachments up by."""
PAGE_SIZE = re.compile(r"[0-9]{1,9}")
"""An ``n`` taken for pagination: plain ASCII digits."""
MAX_PAGE = 1000
CATALOG_PAGE = 100
"""Names in a page of ``/v2/_catalog`` when the client does not say, as distribution answers."""
MAX_RANGES = 64
MAX_DIGITS = 18
"""Digits of a byte position in a Range header: more name no position in any blob."""


WHOLE, PARTS, NONE = "whole", "parts", "none"


def range_answer(header: bytes | None, size: int) -> str:
    """How to answer a Range header on a blob of ``size`` bytes, as Go's ServeContent (and
    so distribution) does: ``WHOLE`` (200 with the blob) for no header, one that is not
    bytes, more than ``MAX_RANGES`` ranges, or ranges adding up to more than the blob;
    ``NONE`` (416) when no range overlaps the blob; ``PARTS`` otherwise. A header that is
    not well-formed is ignored (``WHOLE``), as the RFC allows."""
    if header is None:
        return WHOLE
    unit, _, specs = header.partition(b"=")
    if unit.strip().lower() != b"bytes":
        return WHOLE
    parts = specs.split(b",")
    if len(parts) > MAX_RANGES:
        return WHOLE
    total = 0
    satisfiable = 0
    spans: list[tuple[int, int]] = []
    for part in parts:
        first, dash, last = part.strip().partition(b"-")
        if len(first) > MAX_DIGITS or len(last) > MAX_DIGITS:
            return WHOLE  # past any blob (and past what int() reads): not a range of one
        if not dash or not (first.isdigit() or first == b"") or not (last.isdigit() or last == b"") \
                or first == last == b"" or (first and last and int(last) < int(first)):
            return WHOLE  # not a range: ignored, as the RFC allows
        if first == b"":
            if int(last or b"0") >= size:
                return WHOLE  # a suffix covering the blob is the blob
            length = int(last or b"0")
            start = size - length
        else:
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
            length = max(end - start + 1, 0)
        total += length
        satisfiable += length > 0
        if length > 0:
            spans.append((start, start + length))
    if total > size:
        return WHOLE
    spans.sort()
    if any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False)):
        return WHOLE  # overlapping ranges: the blob, as README says
    return PARTS if satisfiable else NONE


def _host(request: IRequest) -> str:
    """The host the client named, for pull commands and signed identities."""
    return (request.getHeader(b"host") or b"localhost").decode("latin-1")


def _arg(request: IRequest, name: bytes) -> str | None:
    values = (request.args or {}).get(name)
    return values[0].decode("utf-8", "replace") if values else None


BLOB_CHUNK = 1024 * 1024


class _BlobFile(static.File):
    """A stored blob as a file resource: HEAD, Range and Content-Length come with it.
    It is sent in 1 MiB chunks rather than 64 KiB: a sixteenth of the trips through
    the reactor for the same bytes."""

    isLeaf = True

    def makeProducer(self, request: Any, fileForReading: Any) -> Any:
        producer = super().makeProducer(request, fileForReading)
        producer.bufferSize = BLOB_CHUNK
        return producer

    def render_HEAD(self, request: Any) -> Any:
        """HEAD answers as GET would, ranges included (Twisted's answers a HEAD with a
        Range 200 where the GET is 206): the status and headers, without the bytes."""
        if request.getHeader(b"range") is None or not self.exists():
            return super().render_GET(request)
        self.type, self.encoding = static.getTypeAndEncoding(
            self.basename(), self.contentTypes, self.contentEncodings, self.defaultType)
        request.setHeader(b"accept-ranges", b"bytes")
        opened = self.openForReading()
        try:
            self.makeProducer(request, opened)
        finally:
            opened.close()
        return b""


def _blob_file(path: str) -> IResource:
    return _BlobFile(path, defaultType="application/octet-stream")


def _split(rest: str) -> tuple[str, str, str]:
    """``<name>/manifests/<ref>`` or ``<name>/blobs/<digest>`` -> (name, kind, ref)."""
    for kind in ("manifests", "blobs", "referrers"):
        name, found, ref = rest.rpartition("/" + kind + "/")
        if found and name and ref and "/" not in ref:
            return name, kind, ref
    raise no_endpoint("/v2/" + rest)
