"""``twistd nixeryd``: options and the wiring of every part. The only module,
with ``cli.py``, that touches the global reactor and the process environment."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, Mapping

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from nixeryd import __version__
from nixeryd.build.builder import ImageBuilder
from nixeryd.build.fingerprint import PathFingerprint
from nixeryd.build.nix import NixBuilder
from nixeryd.build.pkgsource import PathSource
from nixeryd.build.popularity import load_popularity
from nixeryd.config import Config, ConfigError
from nixeryd.core.offload import Offload, thread_pool
from nixeryd.http.auth import Authenticator, parse_htpasswd, parse_tokens
from nixeryd.http.connection import PlainHTTPFactory, make_site
from nixeryd.http.imagepage import ImagePages
from nixeryd.http.index import Status
from nixeryd.http.registry import RegistryAPI
from nixeryd.image import cosign
from nixeryd.ops.buildlog import BuildLogs
from nixeryd.ops.metrics import Metrics
from nixeryd.registry.images import Images
from nixeryd.registry.leases import BuildLeases
from nixeryd.registry.signatures import Signatures
from nixeryd.storage.filesystem import FilesystemStorage
from nixeryd.storage.interface import IStorage

log = Logger()

Reactor = Any
"""The global reactor, used as the many interfaces it provides (time, processes, TCP,
threads, system events): no one Twisted type names them all."""

FILE_THREADS = 4
AUTH_THREADS = 2
REMOTE_THREADS = 10  # the connection pool size of the GCS client (requests') and of boto3

def default_nix_dir() -> str:
    """The Nix expressions: beside the package in a checkout, else the installed copy."""
    checkout = Path(__file__).resolve().parent.parent / "nix"
    if (checkout / "build.nix").is_file():
        return str(checkout)
    return os.path.join(sys.prefix, "share", "nixeryd", "nix")


HOST_NIX_CONF_DIR = "/etc/nix"


def nix_conf_dir(environ: Mapping[str, str], host_dir: str = HOST_NIX_CONF_DIR) -> str | None:
    """Where nixeryd's Nix processes read nix.conf: nowhere new where the host has one
    (in ``NIX_CONF_DIR``, else /etc/nix), which is then used as it is; else nixeryd's
    own ``etc/nix`` (builds as the user running Nix, no sandbox), so that a fresh
    host needs no file written outside nixeryd's own."""
    host = environ.get("NIX_CONF_DIR") or host_dir
    if os.path.exists(os.path.join(host, "nix.conf")):
        return None
    checkout = Path(__file__).resolve().parent.parent / "etc" / "nix"
    if (checkout / "nix.conf").is_file():
        return str(checkout)
    return os.path.join(sys.prefix, "share", "nixeryd", "etc", "nix")


class Options(usage.Options):
    """Command-line options; each overrides the environment variable it names."""

    optParameters = [
        ["channel", None, None, "nixpkgs channel or commit (NIXERY_CHANNEL)."],
        ["pkgs-repo", None, None, "git repository of the package set (NIXERY_PKGS_REPO)."],
        ["pkgs-path", None, None, "local path of the package set (NIXERY_PKGS_PATH)."],
        ["storage-path", None, None, "where the filesystem backend stores blobs (STORAGE_PATH)."],
        ["nix-timeout", None, None, "seconds a Nix build may take (NIX_TIMEOUT)."],
        ["popularity", None, None, "popularity data, a URL or a file (NIX_POPULARITY_URL)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_version(self) -> None:
        """Print nixeryd's version and exit."""
        sys.stdout.write(f"nixeryd {__version__}\n")
        raise SystemExit(0)

    def opt_listen(self, description: str) -> None:
        """Listen on a Twisted endpoint, e.g. tcp:8080 (repeatable; default from PORT)."""
        self["listen"].append(description)

    def config(self, environ: dict[str, str], cwd: str) -> Config:
        """The environment's settings with these options applied."""
        env = dict(environ)
        for option, variable in [
            ("channel", "NIXERY_CHANNEL"),
            ("pkgs-repo", "NIXERY_PKGS_REPO"),
            ("pkgs-path", "NIXERY_PKGS_PATH"),
            ("storage-path", "STORAGE_PATH"),
            ("nix-timeout", "NIX_TIMEOUT"),
            ("popularity", "NIX_POPULARITY_URL"),
        ]:
            if self[option] is not None:
                env[variable] = self[option]
        config = Config.from_env(env, cwd=cwd, cpu_count=os.cpu_count() or 1)
        if self["listen"]:
            config = config.with_overrides(listen=tuple(self["listen"]))
        return config


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
    """Stops running Nix builds when nixeryd stops."""

    def __init__(self, nix: NixBuilder) -> None:
        self.nix = nix

    def stopService(self) -> Any:
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

    def _measure(self) -> Any:
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


def _storage(config: Config, offload: Offload, reactor: Reactor) -> IStorage:
    if config.storage_backend == "filesystem":
        try:
            return FilesystemStorage(config.storage_path, offload)
        except ValueError as e:
            raise ConfigError(f"STORAGE_PATH: {e}") from None
    if config.storage_backend == "s3":
        return _s3_storage(config, offload, reactor)
    return _gcs_storage(config, offload, reactor)


def _s3_storage(config: Config, offload: Offload, reactor: Reactor) -> IStorage:
    from nixeryd.storage import s3

    assert config.s3_bucket is not None
    try:
        client, url_client = s3.connect(config.s3_bucket, region=config.aws_region,
                                        connect_timeout=config.storage_connect_timeout,
                                        deadline=config.storage_deadline)
    except ValueError as e:
        raise ConfigError(f"S3_BUCKET: {e}") from None
    return s3.S3Storage(
        client, config.s3_bucket, offload, url_client=url_client, presigned=config.s3_presigned_urls,
        url_ttl=config.signed_url_ttl, staging_dir=os.path.join(config.storage_path, "staging"),
        deadline=config.storage_deadline, cooldown=config.storage_cooldown, clock=reactor,
    )


def _gcs_storage(config: Config, offload: Offload, reactor: Reactor) -> IStorage:
    from datetime import datetime

    from nixeryd.storage import gcs, signing

    assert config.gcs_bucket is not None
    endpoint = config.storage_emulator_host or gcs.DEFAULT_ENDPOINT
    key: signing.SigningKey | None = None
    try:
        if config.gcs_signing_key is not None and config.gcs_signing_account is not None:
            key = signing.load_pem_key(config.gcs_signing_key, config.gcs_signing_account)
        elif config.google_credentials is not None:
            key = signing.load_service_account(config.google_credentials)
    except ValueError as e:
        variable = "GCS_SIGNING_KEY" if config.gcs_signing_key else "GOOGLE_APPLICATION_CREDENTIALS"
        raise ConfigError(f"{variable}: {e}") from None
    try:
        bucket = gcs.connect(
            config.gcs_bucket,
            emulator=config.storage_emulator_host,
            credentials_file=config.google_credentials,
        )
    except ValueError as e:
        raise ConfigError(f"GCS_BUCKET: {e}") from None
    bucket_name, ttl = config.gcs_bucket, config.signed_url_ttl

    def signed(name: str) -> str:
        assert key is not None
        now = datetime.fromtimestamp(reactor.seconds(), UTC)
        return signing.signed_url(key, bucket_name, name, now=now, expires=ttl, endpoint=endpoint)

    redirect = signed if key is not None else gcs.plain_url(endpoint, bucket_name)
    if config.signing_service_account is not None:
        iam = _iam_signer(config)

        def signed_by_iam(name: str) -> str:
            now = datetime.fromtimestamp(reactor.seconds(), UTC)
            return signing.signed_url(iam, bucket_name, name, now=now, expires=ttl, endpoint=endpoint)

        redirect = signed_by_iam
    return gcs.GCSStorage(
        bucket, offload, redirect=redirect, redirect_blocks=config.signing_service_account is not None,
        url_lifetime=ttl / 2, staging_dir=os.path.join(config.storage_path, "staging"),
        connect_timeout=config.storage_connect_timeout, deadline=config.storage_deadline,
        cooldown=config.storage_cooldown, clock=reactor,
    )


def _signatures(config: Config, builder: ImageBuilder, images: Images) -> Signatures | None:
    """Image signatures, when NIXERY_SIGNING_KEY names a key."""
    if config.image_signing_key is None:
        return None
    try:
        key = cosign.load_signing_key(config.image_signing_key)
    except ValueError as e:
        raise ConfigError(f"NIXERY_SIGNING_KEY: {e}") from None
    return Signatures(key, config.image_signing_identity, builder.blobs, images)


def _iam_signer(config: Config) -> Any:
    """Keyless signing: the IAM Credentials API with the workload's own credentials (the
    emulator's anonymous ones in tests)."""
    from google.auth import default
    from google.auth.credentials import AnonymousCredentials
    from google.auth.exceptions import GoogleAuthError
    from google.auth.transport.requests import AuthorizedSession

    from nixeryd.storage.signing import IAM_ENDPOINT, IAMSigner

    assert config.signing_service_account is not None
    try:
        if config.storage_emulator_host is not None:
            credentials: Any = AnonymousCredentials()
        else:
            credentials, _ = default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
    except GoogleAuthError as e:
        raise ConfigError(f"NIXERY_SIGNING_ACCOUNT: no credentials to call IAM signBlob with ({e})") from None
    return IAMSigner(config.signing_service_account, AuthorizedSession(credentials),
                     endpoint=config.iam_endpoint or IAM_ENDPOINT)


def load_popularity_setting(config: Config) -> dict[str, int]:
    """Blocking, for start-up (before the reactor serves anything): the popularity
    data NIX_POPULARITY_URL names, or none."""
    if config.popularity_url is None:
        return {}
    try:
        return load_popularity(config.popularity_url)
    except ValueError as e:
        raise ConfigError(f"NIX_POPULARITY_URL: {e}") from None


@dataclass
class Parts:
    """The wired parts of nixeryd, below HTTP; ``top`` starts and stops them."""

    top: MultiService
    storage: IStorage
    builder: ImageBuilder
    images: Images
    metrics: Metrics
    logs: BuildLogs
    offload: Offload  # packing and hashing
    auth_offload: Offload  # password checks (bcrypt), apart so that logging in never waits on packing


def build_parts(config: Config, reactor: Reactor, popularity: Mapping[str, int]) -> Parts:
    """Storage, Nix, builder and caches, wired from ``config``; no listening yet."""
    top = MultiService()

    def pool(name: str, threads: int) -> Offload:
        threads_pool = ThreadPool(minthreads=0, maxthreads=threads, name="nixeryd-" + name)
        ThreadPoolService(threads_pool).setServiceParent(top)
        return thread_pool(reactor, threads_pool)

    # Work is split by kind, so that one kind never queues behind another: packing and
    # hashing (CPU: zlib and hashlib release the GIL), local file I/O, and calls to a
    # remote bucket (requests' connection pool keeps REMOTE_THREADS connections).
    offload = pool("cpu", max(2, os.cpu_count() or 1))
    files = pool("files", FILE_THREADS)
    remote = pool("remote", REMOTE_THREADS) if config.storage_backend in ("gcs", "s3") else files
    storage = _storage(config, files if config.storage_backend == "filesystem" else remote, reactor)
    nix_dir = config.nix_dir or default_nix_dir()
    if not os.path.isfile(os.path.join(nix_dir, "build.nix")):
        raise ConfigError(f"NIXERY_NIX_DIR: no build.nix in {nix_dir}")
    nix = NixBuilder(reactor, nix_dir, config.child_environment,
                     timeout=config.nix_timeout, deadline=config.build_deadline,
                     conf_dir=nix_conf_dir(config.child_environment), offload=offload)
    NixService(nix).setServiceParent(top)
    metrics = Metrics()
    if config.storage_backend == "filesystem":
        StorageUsage(config.storage_path, metrics, files, reactor).setServiceParent(top)
    logs = BuildLogs()
    LogObserverService(logs).setServiceParent(top)
    builder = ImageBuilder(
        nix=nix,
        storage=storage,
        offload=offload,
        source=config.source,
        clock=reactor,
        popularity=popularity,
        layer_budget=config.layer_budget,
        max_builds=config.max_builds,
        queue=config.build_queue,
        metrics=metrics,
        compression=config.layer_compression,
    )
    images = Images(
        builder, storage, config.source, reactor,
        cache_ttl=config.cache_ttl, platforms=config.platforms, metrics=metrics,
        failure_ttl=config.failure_ttl,
        fingerprint=PathFingerprint(config.source.path, files, reactor, config.path_recheck)
        if isinstance(config.source, PathSource) else None,
        leases=BuildLeases(storage, reactor, ttl=config.lease_ttl, failure_ttl=config.failure_ttl,
                           wait_limit=config.build_deadline + config.lease_ttl),
    )
    return Parts(top, storage, builder, images, metrics, logs, offload, pool("auth", AUTH_THREADS))


def _read_setting_file(variable: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{variable}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _authenticator(config: Config, offload: Offload, reactor: Reactor) -> Authenticator:
    users: dict[str, str] = {}
    tokens: frozenset[str] = frozenset()
    if config.htpasswd is not None:
        try:
            users = parse_htpasswd(_read_setting_file("NIXERY_HTPASSWD", config.htpasswd), config.htpasswd)
        except ValueError as e:
            raise ConfigError(f"NIXERY_HTPASSWD: {e}") from None
        if not users:
            raise ConfigError(f"NIXERY_HTPASSWD: {config.htpasswd} lists no user")
    if config.tokens_file is not None:
        tokens = parse_tokens(_read_setting_file("NIXERY_TOKENS_FILE", config.tokens_file))
        if not tokens:
            raise ConfigError(f"NIXERY_TOKENS_FILE: {config.tokens_file} holds no token")
    return Authenticator(users, tokens, offload, reactor)


def build_service(config: Config, reactor: Reactor) -> MultiService:
    """Every part of a running nixeryd, wired from ``config``."""
    parts = build_parts(config, reactor, load_popularity_setting(config))
    builder = parts.builder
    status = Status(
        source=config.source.describe(),
        active=lambda: builder.activity.active,
        failures=lambda: list(builder.activity.failures),
        tail=parts.logs.tail,
        now=reactor.seconds,
        storage=describe_storage(config),
        listen=", ".join(config.listen),
        catalogue=parts.images.catalogue,
    )
    signatures = _signatures(config, parts.builder, parts.images)
    api = RegistryAPI(
        parts.images, parts.storage, config.base_packages, metrics=parts.metrics, status=status,
        auth=_authenticator(config, parts.auth_offload, reactor),
        signatures=signatures,
        pages=ImagePages(parts.images, parts.storage, parts.offload, signing=signatures is not None),
    )
    site = make_site(api.app.resource(), parts.metrics)
    Announce(config).setServiceParent(parts.top)
    listeners = Listeners()
    listeners.setServiceParent(parts.top)
    for description in config.listen:
        try:
            # strports' service fails start-up when it cannot listen, rather than
            # logging the error and running on deaf.
            service = strports.service(description, PlainHTTPFactory(site), reactor=reactor)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--listen: bad endpoint {description!r}: {e}") from None
        service.setServiceParent(listeners)
    return parts.top


def makeService(options: Options, reactor: Reactor | None = None) -> IService:
    """twistd's entry point. A bad setting ends start-up with one line naming it."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        config = options.config(dict(os.environ), os.getcwd())
        return build_service(config, reactor)
    except ConfigError as e:
        # twistd has no way to refuse start-up without a traceback but to exit.
        sys.stderr.write(f"nixeryd: {e}\n")
        raise SystemExit(1) from None
