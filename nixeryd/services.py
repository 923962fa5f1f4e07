"""The services a running nixeryd is made of, besides the parts themselves: log
observers, listeners, thread pools, Nix's stop, the start-up line and storage metrics."""
from __future__ import annotations

import os
import sys

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.threadpool import ThreadPool

from nixeryd import __version__
from nixeryd.build.nix import NixBuilder
from nixeryd.config import Config
from nixeryd.core.offload import Offload
from nixeryd.ops.metrics import Metrics

log = Logger()


class LogObserverService(Service):
    """Adds a log observer while the service runs."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self.observer)

    def stopService(self) -> None:
        super().stopService()
        globalLogPublisher.removeObserver(self.observer)


class Listeners(MultiService):
    """The listening endpoints. One that cannot listen (a port in use, a socket path not
    writable) stops start-up with one line naming it, not a traceback."""

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface or '*'}:{e.port}"
            sys.stderr.write(f"nixeryd: --listen/PORT: cannot listen on {where}: {e.socketError}\n")
            raise SystemExit(1) from None


class NixService(Service):
    """Finds, once started, which of Nix's binary caches answer (so that the first build
    need not wait for it); stops running Nix builds when nixeryd stops."""

    def __init__(self, nix: NixBuilder) -> None:
        self.nix = nix

    def startService(self) -> None:
        super().startService()
        self.nix.prepare()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.nix.stop()


def describe_storage(config: Config) -> str:
    if config.storage_backend == "gcs":
        return f"GCS bucket {config.gcs_bucket}"
    if config.storage_backend == "s3":
        return f"S3 bucket {config.s3_bucket} ({config.aws_region})"
    return f"directory {config.storage_path}"


class Announce(Service):
    """Says, once started, what this instance serves, from where, and where it listens."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def startService(self) -> None:
        super().startService()
        log.info("nixeryd {version}: package set: {source}; storage: {storage}; listening on: {listen}",
                 version=__version__, source=self.config.source.describe(),
                 storage=describe_storage(self.config), listen=", ".join(self.config.listen))


def disk_usage(root: str) -> tuple[int, int]:
    """Blocking: bytes stored under ``root`` (blobs and records) and bytes free on its disk."""
    stored = 0
    for directory, _, files in os.walk(root):
        for name in files:
            try:
                stored += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                continue
    free = os.statvfs(root)
    return stored, free.f_bavail * free.f_frsize


class StorageUsage(Service):
    """Measures the filesystem backend's use for /metrics, in a thread, every minute."""

    def __init__(self, root: str, metrics: Metrics, offload: Offload, reactor: IReactorTime,
                 every: float = 60.0) -> None:
        self.root = root
        self.metrics = metrics
        self.offload = offload
        self.loop = LoopingCall(self._measure)
        self.loop.clock = reactor
        self.every = every

    def startService(self) -> None:
        super().startService()
        done = self.loop.start(self.every, now=True)
        done.addErrback(lambda failure: log.failure("measuring storage failed", failure))

    def stopService(self) -> None:
        super().stopService()
        if self.loop.running:
            self.loop.stop()

    async def _run(self) -> None:
        try:
            stored, free = await self.offload(disk_usage, self.root)
        except OSError as e:
            log.warn("cannot measure storage: {error}", error=str(e))
            return
        self.metrics.storage_bytes.labels(kind="stored").set(stored)
        self.metrics.storage_bytes.labels(kind="free").set(free)

    def _measure(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run())


class ThreadPoolService(Service):
    """Starts and stops the thread pool that blocking work runs in."""

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
