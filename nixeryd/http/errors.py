"""Registry errors: the distribution spec's JSON, and what each failure becomes.

Registry clients show people little of an error: Docker, containerd and
containers/image (podman, skopeo, buildah) print a registry error's ``message``
for 4xx statuses only, and for a 5xx only the status line; containerd's ``ctr``
prints the status line alone, whatever the status (it asks with ``HEAD``, which
has no body). So every error also says its reason in the status line's reason
phrase (``HTTP/1.1 422 cannot build broken-1.0: ...``), the one text all of them
print, and the status says what a retry would give:

- 404: the name is not in the package set;
- 422: the name is there but cannot become an image, and will not until the
  package set or the registry changes (its attribute throws, a builder fails, no
  builder serves its platform);
- 429 and 503 with ``Retry-After``: asking again later can succeed (the build
  queue is full, a time limit stopped the build, the package set or storage
  cannot be reached).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Awaitable, Sequence, TypeVar

from twisted.logger import Logger

from nixeryd.build.builder import BuildQueueFull
from nixeryd.build.failures import (
    BuildersUnavailable,
    NixError,
    NixTimedOut,
    PackagesNotFound,
    PlatformUnavailable,
    SourceUnavailable,
)
from nixeryd.image.names import (
    Digest,
    DigestInvalid,
    ImageSpec,
    NameInvalid,
    ReferenceInvalid,
    Tag,
    parse_digest,
    parse_name,
    parse_reference,
)
from nixeryd.storage.interface import StorageError

log = Logger()

T = TypeVar("T")

RETRY_AFTER_SECONDS = 10
MAX_PHRASE = 400
"""Most bytes of a reason phrase: Go's and Python's clients take far longer status lines."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


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

    def phrase(self) -> bytes:
        """The reason phrase: the message's first line, without control characters (no
        header can be forged through it), cut at ``MAX_PHRASE`` bytes."""
        return reason_phrase(self.message)


def reason_phrase(text: str) -> bytes:
    line = _CONTROL.sub(" ", text.split("\n", 1)[0]).strip() or "error"
    raw = line.encode("utf-8")
    if len(raw) > MAX_PHRASE:
        raw = raw[:MAX_PHRASE - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."
    return raw


def _retry_after(error: NixError) -> int:
    if error.retry_after is None:
        return RETRY_AFTER_SECONDS
    return max(1, math.ceil(error.retry_after))


async def as_registry_errors(name: str, pending: Awaitable[T]) -> T:
    """Waits for a build; its failures become registry errors."""
    try:
        return await pending
    except PackagesNotFound as e:
        detail: dict[str, Any] = {"packages": list(e.packages)}
        if e.reason:
            # In the set, but its attribute throws (a removed alias, an unfree or broken
            # package): Nix's own words first, and a status ctr shows them with.
            detail["nix"] = e.reason
            raise RegistryError(422, "MANIFEST_UNKNOWN", e.message, detail) from None
        raise RegistryError(404, "MANIFEST_UNKNOWN", e.message or "packages not found: " + ", ".join(e.packages),
                            detail) from None
    except NixTimedOut as e:
        log.error("build of {image} stopped: {message}", image=name, message=e.summary)
        raise RegistryError(503, "UNKNOWN", e.message, {"limit": e.limit, "seconds": e.seconds},
                            retry_after=_retry_after(e)) from None
    except (SourceUnavailable, BuildersUnavailable) as e:
        log.error("build of {image} failed: {message}", image=name, message=e.summary)
        raise RegistryError(503, "UNKNOWN", e.message, retry_after=_retry_after(e)) from None
    except PlatformUnavailable as e:
        log.error("build of {image} failed: {message}", image=name, message=e.summary)
        raise RegistryError(422, "UNSUPPORTED", e.message, {"platform": e.wanted, "host": e.here}) from None
    except NixError as e:
        log.error("build of {image} failed: {message}", image=name, message=e.summary)
        raise RegistryError(422, "UNKNOWN", e.message) from None
    except BuildQueueFull:
        raise RegistryError(
            429, "TOOMANYREQUESTS", "too many images are being built; try again shortly",
            retry_after=RETRY_AFTER_SECONDS,
        ) from None
    except StorageError as e:
        raise unavailable(e) from None


async def storage_call(pending: Awaitable[T]) -> T:
    try:
        return await pending
    except StorageError as e:
        raise unavailable(e) from None


def no_endpoint(path: str) -> RegistryError:
    return RegistryError(404, "NAME_UNKNOWN", "no such endpoint in the registry API", {"path": path})


def unsupported() -> RegistryError:
    return RegistryError(
        405, "UNSUPPORTED", "this registry builds images on demand; pushing and deleting are not supported"
    )


def unavailable(error: StorageError) -> RegistryError:
    log.error("storage failed: {error}", error=str(error))
    return RegistryError(
        503, "UNKNOWN", "storage is unavailable; try again shortly", retry_after=RETRY_AFTER_SECONDS
    )


def parsed_name(name: str, base_packages: Sequence[str]) -> ImageSpec:
    """The image ``name`` asks for; 400 NAME_INVALID when it breaks the grammar."""
    try:
        return parse_name(name, base_packages)
    except NameInvalid as e:
        raise RegistryError(400, "NAME_INVALID", str(e), {"name": name}) from None


def parsed_digest(ref: str) -> Digest:
    """A blob's or manifest's digest; 400 DIGEST_INVALID when it is not one."""
    try:
        return parse_digest(ref)
    except DigestInvalid as e:
        raise RegistryError(400, "DIGEST_INVALID", str(e), {"digest": ref}) from None


def parsed_reference(ref: str) -> Tag | Digest:
    """A manifest reference: a malformed digest is 400 DIGEST_INVALID, a malformed tag 404
    MANIFEST_UNKNOWN (no manifest can have it), as distribution answers."""
    try:
        return parse_reference(ref)
    except DigestInvalid as e:
        raise RegistryError(400, "DIGEST_INVALID", str(e), {"digest": ref}) from None
    except ReferenceInvalid as e:
        raise RegistryError(404, "MANIFEST_UNKNOWN", str(e), {"reference": ref}) from None
