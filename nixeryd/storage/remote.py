"""What the bucket backends (GCS, S3) share: blocking client calls in a thread pool,
each within a deadline and behind a circuit breaker, a local staging directory for
blobs on their way up, and the blobs known to be in the bucket."""
from __future__ import annotations

import base64
import os
import secrets
from collections import OrderedDict
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import Logger

from nixeryd.offload import Offload
from nixeryd.storage.breaker import CircuitBreaker
from nixeryd.storage.interface import StorageError, remove_quietly

log = Logger()

BLOB_TYPE = "application/octet-stream"
MIN_TRANSFER_RATE = 10 * 1024 * 1024
"""Bytes a second a transfer is allowed at the least, beyond the deadline every call has."""


def md5_base64(hex_md5: str) -> str:
    """GCS's MD5 and S3's Content-MD5: base64 of the raw digest."""
    return base64.b64encode(bytes.fromhex(hex_md5)).decode("ascii")


class RemoteStorage:
    """The shared half of a bucket backend; subclasses name their ``backend`` and the
    client's exceptions (``failures``), which become ``StorageError``."""

    backend = "remote"

    def __init__(
        self,
        offload: Offload,
        *,
        failures: tuple[type[BaseException], ...],
        staging_dir: str,
        known_blobs: int,
        deadline: float,
        cooldown: float,
        clock: IReactorTime | None,
    ) -> None:
        # Without a clock (unit tests calling inline) deadlines never fire.
        self._clock = clock if clock is not None else Clock()
        self.breaker = CircuitBreaker(self._clock, cooldown=cooldown, name="the bucket")
        self._offload = offload
        self._failures = failures
        self._deadline = deadline
        self._staging = staging_dir
        os.makedirs(staging_dir, exist_ok=True)
        # Blobs known to be in the bucket (written or looked up here), touched only on
        # the reactor thread: they are served without another lookup.
        self._known: OrderedDict[str, None] = OrderedDict()
        self._known_max = known_blobs

    def staging_path(self) -> str:
        return os.path.join(self._staging, "blob-" + secrets.token_hex(16))

    def discard(self, staged: str) -> None:
        remove_quietly(staged)

    def _remember(self, key: str) -> None:
        self._known[key] = None
        while len(self._known) > self._known_max:
            self._known.popitem(last=False)

    def _call(self, action: str, fn: Callable[..., Any], *args: Any, size: int = 0) -> Deferred[Any]:
        """Run a blocking call through the offload, within the deadline (longer for
        ``size`` bytes to move) and the circuit breaker; failures become StorageError."""

        def failed(failure: Any) -> Any:
            if failure.check(StorageError):
                return failure
            if failure.check(*self._failures):
                log.error("{action} failed: {error}", action=action, error=str(failure.value),
                          backend=self.backend)
                raise StorageError(f"{action} failed: {failure.value}")
            return failure

        deadline = self._deadline + size / MIN_TRANSFER_RATE
        return self.breaker.call(action, lambda: self._offload(fn, *args).addErrback(failed), deadline)
