"""The parts of nixeryd below HTTP (storage, Nix, the builder, images, caches), wired
from the settings, for ``twistd nixeryd`` and the ``nixeryd`` command alike."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any, Mapping

from twisted.application.service import MultiService
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from nixeryd.build.builder import ImageBuilder
from nixeryd.build.fingerprint import PathFingerprint
from nixeryd.build.known import KnownPackages
from nixeryd.build.nix import NixBuilder
from nixeryd.build.pkgsource import PathSource
from nixeryd.build.popularity import load_popularity
from nixeryd.build.substituters import BinaryCaches
from nixeryd.config import Config, ConfigError
from nixeryd.core.offload import Offload, thread_pool
from nixeryd.http.auth import Authenticator, parse_htpasswd, parse_tokens
from nixeryd.image import cosign
from nixeryd.ops.buildlog import BuildLogs
from nixeryd.ops.metrics import Metrics
from nixeryd.registry.images import Images
from nixeryd.registry.leases import BuildLeases
from nixeryd.registry.signatures import Signatures
from nixeryd.services import LogObserverService, NixService, StorageUsage, ThreadPoolService
from nixeryd.storage.filesystem import FilesystemStorage
from nixeryd.storage.interface import IStorage

log = Logger()

Reactor = Any
"""The global reactor, used as the many interfaces it provides (time, processes, TCP,
threads, system events): no one Twisted type names them all."""

FILE_THREADS = 4
AUTH_THREADS = 2
PROBE_THREADS = 4
PACKING_NICE = 10
"""How much nicer than the process packing threads run: 10 steps nicer, the kernel gives a
thread at the process's own about nine tenths of a core against one of them."""
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


def _signing_key(config: Config) -> cosign.SigningKey | None:
    if config.image_signing_key is None:
        return None
    try:
        return cosign.load_signing_key(config.image_signing_key)
    except ValueError as e:
        raise ConfigError(f"NIXERY_SIGNING_KEY: {e}") from None


def make_signatures(config: Config, builder: ImageBuilder, images: Images) -> Signatures | None:
    """Image signatures, when NIXERY_SIGNING_KEY names a key."""
    key = _signing_key(config)
    return None if key is None else Signatures(key, config.image_signing_identity, builder.blobs, images)


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

    def pool(name: str, threads: int, nice: int = 0) -> Offload:
        threads_pool = ThreadPool(minthreads=0, maxthreads=threads, name="nixeryd-" + name)
        ThreadPoolService(threads_pool).setServiceParent(top)
        return thread_pool(reactor, threads_pool, nice)

    # Work is split by kind, so that one kind never queues behind another: packing and
    # hashing (CPU: zlib and hashlib release the GIL), local file I/O, and calls to a
    # remote bucket (requests' connection pool keeps REMOTE_THREADS connections).
    offload = pool("cpu", max(2, os.cpu_count() or 1))
    # Big layers are packed niced: a warm pull's few milliseconds on the reactor thread come
    # before a cold image's seconds of compression on every core.
    packing = pool("packing", max(2, os.cpu_count() or 1), nice=PACKING_NICE)
    files = pool("files", FILE_THREADS)
    remote = pool("remote", REMOTE_THREADS) if config.storage_backend in ("gcs", "s3") else files
    storage = _storage(config, files if config.storage_backend == "filesystem" else remote, reactor)
    # Binary caches are asked whether they answer on threads of their own: a cache that
    # does not holds one for seconds.
    caches = BinaryCaches(reactor, pool("probes", PROBE_THREADS))
    nix = NixBuilder(reactor, _nix_dir(config), config.child_environment,
                     timeout=config.nix_timeout, deadline=config.build_deadline,
                     conf_dir=nix_conf_dir(config.child_environment), offload=offload, caches=caches)
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
        known=KnownPackages(storage, files, reactor),
        packing=packing,
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


def make_authenticator(config: Config, offload: Offload, reactor: Reactor) -> Authenticator:
    users, tokens = _access_files(config)
    return Authenticator(users, tokens, offload, reactor)


def _access_files(config: Config) -> tuple[dict[str, str], frozenset[str]]:
    """The users of NIXERY_HTPASSWD and the tokens of NIXERY_TOKENS_FILE."""
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
    return users, tokens


def _nix_dir(config: Config) -> str:
    nix_dir = config.nix_dir or default_nix_dir()
    if not os.path.isfile(os.path.join(nix_dir, "build.nix")):
        raise ConfigError(f"NIXERY_NIX_DIR: no build.nix in {nix_dir}")
    return nix_dir


def check_files(config: Config) -> None:
    """Blocking, before wiring: the files the settings name are there and readable (Nix's
    expressions, access lists, the signing key); ``ConfigError`` naming the setting."""
    _nix_dir(config)
    _access_files(config)
    _signing_key(config)
