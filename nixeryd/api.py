"""The registry's HTTP API: the pull side of the OCI distribution spec.

Knows HTTP, not Nix: images come from an ``ImageBuilder``, blobs from an
``IStorage``. Every error a client can see is the spec's JSON.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from klein import Klein
from twisted.logger import Logger
from twisted.web import static
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from nixeryd.builder import ImageBuilder, StoredManifest
from nixeryd.names import (
    Digest,
    DigestInvalid,
    NameInvalid,
    ReferenceInvalid,
    parse_digest,
    parse_name,
    parse_reference,
)
from nixeryd.nix import NixError, NixTimedOut, PackagesNotFound
from nixeryd.storage.interface import InMemory, IStorage, LocalFile, Redirect, StorageError

log = Logger()

API_VERSION_HEADER = (b"Docker-Distribution-API-Version", b"registry/2.0")
READ_METHODS = ["GET", "HEAD"]
WRITE_METHODS = ["POST", "PUT", "PATCH", "DELETE"]
RETRY_AFTER_SECONDS = 10


class RegistryError(Exception):
    """An error answered with the distribution spec's JSON body."""

    def __init__(
        self, status: int, code: str, message: str, detail: Any = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.retry_after = retry_after

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


def _set(request: IRequest, name: str, value: str | int) -> None:
    request.setHeader(name.encode(), str(value).encode())


class RegistryAPI:
    """The Klein application serving /v2/."""

    app = Klein()

    def __init__(
        self, builder: ImageBuilder, storage: IStorage, base_packages: Sequence[str]
    ) -> None:
        self._builder = builder
        self._storage = storage
        self._base_packages = tuple(base_packages)

    @app.handle_errors(RegistryError)
    def _registry_error(self, request: IRequest, failure: Any) -> bytes:
        error: RegistryError = failure.value
        return self._error_response(request, error)

    @app.handle_errors(HTTPException)
    def _routing_error(self, request: IRequest, failure: Any) -> bytes:
        error: HTTPException = failure.value
        if error.code == 405:
            return self._error_response(request, _unsupported())
        return self._error_response(
            request,
            RegistryError(404, "NAME_UNKNOWN", "no such endpoint in the registry API",
                          {"path": request.path.decode("utf-8", "replace")}),
        )

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Any) -> bytes:
        log.failure("unexpected error answering {uri}", failure, uri=request.uri)
        return self._error_response(
            request, RegistryError(500, "UNKNOWN", "internal error; see the registry's log")
        )

    def _error_response(self, request: IRequest, error: RegistryError) -> bytes:
        body = error.body()
        request.setResponseCode(error.status)
        request.setHeader(*API_VERSION_HEADER)
        _set(request, "Content-Type", "application/json")
        _set(request, "Content-Length", len(body))
        if error.retry_after is not None:
            _set(request, "Retry-After", error.retry_after)
        return body

    @app.route("/v2/", methods=READ_METHODS)
    def base(self, request: IRequest) -> bytes:
        request.setHeader(*API_VERSION_HEADER)
        _set(request, "Content-Type", "application/json")
        _set(request, "Content-Length", 2)
        return b"{}"

    @app.route("/v2/", methods=WRITE_METHODS)
    def base_write(self, request: IRequest) -> bytes:
        raise _unsupported()

    @app.route("/v2/<path:rest>", methods=WRITE_METHODS)
    def write(self, request: IRequest, rest: str) -> bytes:
        raise _unsupported()

    @app.route("/v2/<path:rest>", methods=READ_METHODS)
    async def read(self, request: IRequest, rest: str) -> Any:
        request.setHeader(*API_VERSION_HEADER)
        name, kind, ref = _split(rest)
        if kind == "manifests":
            return await self._manifest(request, name, ref)
        return await self._blob(request, name, ref)

    async def _manifest(self, request: IRequest, name: str, ref: str) -> bytes:
        try:
            image = parse_name(name, self._base_packages)
            reference = parse_reference(ref)
        except NameInvalid as e:
            raise RegistryError(400, "NAME_INVALID", str(e), {"name": name})
        except DigestInvalid as e:
            raise RegistryError(400, "DIGEST_INVALID", str(e), {"digest": ref})
        except ReferenceInvalid as e:
            raise RegistryError(404, "MANIFEST_UNKNOWN", str(e), {"reference": ref})
        if isinstance(reference, Digest):
            stored = await self._storage_call(self._builder.stored_manifest(reference.digest))
            if stored is None:
                raise RegistryError(
                    404, "MANIFEST_UNKNOWN", "no manifest with this digest", {"digest": ref}
                )
        else:
            stored = await self._built(image.name, reference.value, self._builder.manifest(image, reference.value))
        return self._send_manifest(request, stored)

    async def _built(self, name: str, tag: str, pending: Any) -> StoredManifest:
        try:
            result: StoredManifest = await pending
            return result
        except PackagesNotFound as e:
            raise RegistryError(
                404,
                "MANIFEST_UNKNOWN",
                "packages not found: " + ", ".join(e.packages),
                {"packages": list(e.packages)},
            )
        except NixTimedOut as e:
            log.error("build of {image} timed out", image=name, tag=tag)
            raise RegistryError(500, "UNKNOWN", e.message)
        except NixError as e:
            log.error("build of {image} failed: {message}", image=name, tag=tag, message=e.message)
            raise RegistryError(500, "UNKNOWN", e.message)
        except StorageError as e:
            raise _unavailable(e)

    async def _storage_call(self, pending: Any) -> Any:
        try:
            return await pending
        except StorageError as e:
            raise _unavailable(e)

    def _send_manifest(self, request: IRequest, stored: StoredManifest) -> bytes:
        _set(request, "Content-Type", stored.media_type)
        _set(request, "Content-Length", len(stored.body))
        _set(request, "Docker-Content-Digest", stored.digest)
        _set(request, "ETag", '"' + stored.digest + '"')
        return stored.body

    async def _blob(self, request: IRequest, name: str, ref: str) -> Any:
        try:
            parse_name(name, ())
            digest = parse_digest(ref)
        except NameInvalid as e:
            raise RegistryError(400, "NAME_INVALID", str(e), {"name": name})
        except DigestInvalid as e:
            raise RegistryError(400, "DIGEST_INVALID", str(e), {"digest": ref})
        location = await self._storage_call(self._storage.locate_blob(digest.hex))
        if location is None:
            raise RegistryError(404, "BLOB_UNKNOWN", "blob unknown to registry", {"digest": ref})
        _set(request, "Docker-Content-Digest", digest.digest)
        _set(request, "ETag", '"' + digest.digest + '"')
        if isinstance(location, Redirect):
            request.setResponseCode(307)
            request.setHeader(b"Location", location.url.encode())
            _set(request, "Content-Length", 0)
            return b""
        if isinstance(location, InMemory):
            _set(request, "Content-Type", "application/octet-stream")
            _set(request, "Content-Length", len(location.data))
            return location.data
        assert isinstance(location, LocalFile)
        return _blob_file(location.path)


def _blob_file(path: str) -> IResource:
    """A stored blob as a file resource: HEAD, Range and Content-Length come with it."""
    resource = static.File(path, defaultType="application/octet-stream")
    resource.isLeaf = True
    return resource


def _split(rest: str) -> tuple[str, str, str]:
    """``<name>/manifests/<ref>`` or ``<name>/blobs/<digest>`` -> (name, kind, ref)."""
    for kind in ("manifests", "blobs"):
        marker = "/" + kind + "/"
        name, found, ref = rest.rpartition(marker)
        if found and name and ref and "/" not in ref:
            return name, kind, ref
    raise RegistryError(404, "NAME_UNKNOWN", "no such endpoint in the registry API", {"path": "/v2/" + rest})


def _unsupported() -> RegistryError:
    return RegistryError(
        405, "UNSUPPORTED", "this registry builds images on demand; pushing and deleting are not supported"
    )


def _unavailable(error: StorageError) -> RegistryError:
    log.error("storage failed: {error}", error=str(error))
    return RegistryError(
        503, "UNKNOWN", "storage is unavailable; try again shortly", retry_after=RETRY_AFTER_SECONDS
    )
