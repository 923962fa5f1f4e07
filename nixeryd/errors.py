"""Registry errors: the distribution spec's JSON, and what each failure becomes."""
from __future__ import annotations

import json
from typing import Any, Awaitable, TypeVar

from twisted.logger import Logger

from nixeryd.builder import BuildQueueFull
from nixeryd.nix import NixError, NixTimedOut, PackagesNotFound
from nixeryd.storage.interface import StorageError

log = Logger()

T = TypeVar("T")

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


async def as_registry_errors(name: str, pending: Awaitable[T]) -> T:
    """Waits for a build; its failures become registry errors."""
    try:
        return await pending
    except PackagesNotFound as e:
        detail: dict[str, Any] = {"packages": list(e.packages)}
        if e.reason:
            detail["nix"] = e.reason
        raise RegistryError(404, "MANIFEST_UNKNOWN", e.message or "packages not found: " + ", ".join(e.packages),
                            detail) from None
    except NixTimedOut as e:
        log.error("build of {image} timed out", image=name)
        raise RegistryError(500, "UNKNOWN", e.message) from None
    except NixError as e:
        log.error("build of {image} failed: {message}", image=name, message=e.message)
        raise RegistryError(500, "UNKNOWN", e.message) from None
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
