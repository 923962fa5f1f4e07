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
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from nixeryd.http.access import authorized, public
from nixeryd.http.auth import AuthBusy, Authenticator
from nixeryd.http.book import not_built
from nixeryd.http.errors import (
    RegistryError,
    as_registry_errors,
    no_endpoint,
    parsed_digest,
    parsed_name,
    parsed_reference,
    storage_call,
    unsupported,
)
from nixeryd.http.imagepage import ImagePages
from nixeryd.http.imagepage import render as render_page
from nixeryd.http.index import Status, render_index
from nixeryd.http.look import error_page, wants_html
from nixeryd.http.negotiation import (
    API_VERSION_HEADER,
    accepted_types,
    arg_of,
    choose,
    host_of,
    not_modified,
    send_manifest,
    takes_index,
)
from nixeryd.http.ranges import NONE, WHOLE, blob_file, range_answer
from nixeryd.http.sendfile import SendfileProducer, can_sendfile
from nixeryd.http.warm import WarmFirst, WarmManifests
from nixeryd.image import cosign, sbom
from nixeryd.image.names import (
    Digest,
)
from nixeryd.ops.metrics import Metrics
from nixeryd.registry.images import Images
from nixeryd.registry.signatures import Signatures
from nixeryd.storage.interface import InMemory, IStorage, LocalFile, Redirect

log = Logger()

T = TypeVar("T")

READ_METHODS = ["GET", "HEAD"]
WRITE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]
TAGS_SUFFIX = "/tags/list"


def _set(request: IRequest, name: str, value: str | int) -> None:
    request.setHeader(name.encode(), str(value).encode())


class RegistryAPI:
    """The Klein application serving /v2/; ``resource()`` is what a site serves."""

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
        book: IResource | None = None,
    ) -> None:
        self._images = images
        self._book = book if book is not None else not_built()
        self._signatures = signatures
        self._pages = pages
        self._storage = storage
        self._base_packages = tuple(base_packages)
        self._metrics = metrics if metrics is not None else Metrics()
        self._status = status
        self._auth = auth

    @public(app, "/", methods=READ_METHODS)  # shows images only to those access control lets in
    async def index(self, request: IRequest) -> bytes:
        if self._status is None:
            raise no_endpoint("/")
        try:
            full = await self._allowed(request)
        except AuthBusy:
            full = False
        body = await render_index(self._status, host_of(request), secure=request.isSecure(), full=full)
        _set(request, "Content-Type", "text/html; charset=utf-8")
        _set(request, "Content-Length", len(body))
        return body

    @authorized(app, "/image/<path:name>", methods=READ_METHODS)
    async def image_page(self, request: IRequest, name: str) -> bytes:
        """What an image holds, as HTML, or JSON for ``Accept: application/json``."""
        if self._pages is None:
            raise no_endpoint("/image/" + name)
        image = parsed_name(name, self._base_packages)
        manifests = await as_registry_errors(image.name, self._images.manifests(image, "latest", index=False))
        data = await storage_call(Deferred.fromCoroutine(
            self._pages.data(image, manifests, host_of(request), request.isSecure())))
        if "application/json" in accepted_types(request):
            return self._json(request, data)
        body = render_page(data)
        _set(request, "Content-Type", "text/html; charset=utf-8")
        _set(request, "Content-Length", len(body))
        return body

    @public(app, "/docs/", methods=READ_METHODS, branch=True)  # the book holds nothing of this instance's
    def docs(self, request: IRequest) -> IResource:
        return self._book

    @public(app, "/healthz", methods=READ_METHODS)
    def healthz(self, request: IRequest) -> bytes:
        _set(request, "Content-Type", "text/plain; charset=utf-8")
        return b"ok\n"

    @public(app, "/metrics", methods=READ_METHODS)
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

    @authorized(app, "/v2/", methods=READ_METHODS)
    async def base(self, request: IRequest) -> bytes:
        return self._json(request, {})

    async def _allowed(self, request: IRequest) -> bool:
        """Whether access control lets the request in (always, when it is off); raises
        ``AuthBusy`` when too many password checks are under way."""
        if self._auth is None:
            return True
        return bool(await self._auth.check(request.getHeader(b"authorization")))

    async def authorize(self, request: IRequest) -> None:
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

    @public(app, "/v2/", methods=WRITE_METHODS)
    def base_write(self, request: IRequest) -> bytes:
        raise unsupported()

    @public(app, "/v2/<path:rest>", methods=WRITE_METHODS)
    def write(self, request: IRequest, rest: str) -> bytes:
        raise unsupported()

    @authorized(app, "/v2/<path:rest>", methods=READ_METHODS)
    async def read(self, request: IRequest, rest: str) -> Any:
        request.setHeader(*API_VERSION_HEADER)
        if rest == "_catalog":
            every = await storage_call(Deferred.fromCoroutine(self._images.catalogue()))
            names = self._page(request, every, "/v2/_catalog", default=CATALOG_PAGE)
            return self._json(request, {"repositories": names})
        if rest.endswith(TAGS_SUFFIX):
            name = rest[: -len(TAGS_SUFFIX)]
            spelling = parsed_name(name, ()).spelling  # the name its tags are recorded under
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
        image, digest = parsed_name(name, self._base_packages), parsed_digest(ref)
        attached = await storage_call(Deferred.fromCoroutine(self._images.referrers_of(image, digest.digest)))
        entries = [(stored.body, sbom.SPDX_TYPE) for stored in attached]
        if entries and self._signatures is not None:
            signed = await storage_call(Deferred.fromCoroutine(
                self._signatures.signature(image, digest.hex, host_of(request))))
            if signed is not None:
                entries.append((signed.body, SIGNATURE_ARTIFACT))
        wanted = arg_of(request, b"artifactType")
        if wanted is not None:
            entries = [entry for entry in entries if entry[1] == wanted]
            _set(request, "OCI-Filters-Applied", "artifactType")
        body = sbom.referrers_index(entries)
        _set(request, "Content-Type", sbom.OCI_INDEX)
        _set(request, "Content-Length", len(body))
        return body

    def resource(self) -> IResource:
        """What a site serves: warm manifest pulls the short way (``http/warm.py``), every
        other request by the routes above."""
        warm = WarmManifests(self._images, self._auth, self._base_packages, self._metrics)
        return WarmFirst(self.app.resource(), warm)

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
        last = arg_of(request, b"last")
        if last is not None:
            items = [i for i in items if i > last]
        raw_n = arg_of(request, b"n") or None  # an empty n is no n
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

    async def _manifest(self, request: IRequest, name: str, ref: str) -> bytes:
        image, reference = parsed_name(name, self._base_packages), parsed_reference(ref)
        if isinstance(reference, Digest):
            stored = await storage_call(self._images.stored_manifest(reference.digest))
            if stored is None:
                raise RegistryError(
                    404, "MANIFEST_UNKNOWN", "no manifest with this digest", {"digest": ref}
                )
        elif cosign.SIGNATURE_TAG.fullmatch(reference.value):
            # cosign's and containers/image's lookups of a signature, attestation or SBOM:
            # never an image to build.
            signed = None
            if self._signatures is not None and reference.value.endswith(".sig"):
                signed = await storage_call(Deferred.fromCoroutine(
                    self._signatures.signature(image, reference.value[7:71], host_of(request))))
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
        return send_manifest(request, stored, self._metrics)

    async def _blob(self, request: IRequest, name: str, ref: str) -> Any:
        parsed_name(name, ())
        digest = parsed_digest(ref)
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
        return blob_file(location.path)

    def _served(self, request: IRequest, size: int) -> None:
        if request.method == b"GET":
            self._metrics.served_bytes.inc(size)


SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
"""The artifact type a signature is listed with among an image's referrers."""
PAGE_SIZE = re.compile(r"[0-9]{1,9}")
"""An ``n`` taken for pagination: plain ASCII digits."""
MAX_PAGE = 1000
CATALOG_PAGE = 100
"""Names in a page of ``/v2/_catalog`` when the client does not say, as distribution answers."""


def _split(rest: str) -> tuple[str, str, str]:
    """``<name>/manifests/<ref>`` or ``<name>/blobs/<digest>`` -> (name, kind, ref)."""
    for kind in ("manifests", "blobs", "referrers"):
        name, found, ref = rest.rpartition("/" + kind + "/")
        if found and name and ref and "/" not in ref:
            return name, kind, ref
    raise no_endpoint("/v2/" + rest)
