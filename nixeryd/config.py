"""Settings: the environment (with the Go Nixery's names) and option overrides.

The only module that interprets environment variables; it is handed the mapping
and never reads the process environment itself. Pure.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from nixeryd.build.pkgsource import (
    CHANNEL_URL,
    FLAKE_REF,
    ChannelSource,
    FlakeSource,
    GitSource,
    PackageSource,
    PathSource,
)
from nixeryd.image.names import AMD64, ARM64, DEFAULT_BASE_PACKAGES, Arch
from nixeryd.settings import READABLE, documented_default

BACKENDS = ("filesystem", "gcs", "s3")
PLATFORMS = {"linux/amd64": AMD64, "linux/arm64": ARM64, "linux/arm64/v8": ARM64}

T = TypeVar("T")


class ConfigError(ValueError):
    """A missing or bad setting; ``str()`` is one line naming it."""


def _int(variable: str, raw: str, low: int, high: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{variable}: must be a whole number {bound}, got {raw!r}")
    return value


def _seconds(variable: str, raw: str, *, zero: bool = False) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        value = math.nan
    if not ((value >= 0 if zero else value > 0) and math.isfinite(value)):
        kind = "zero or a positive" if zero else "a positive"
        raise ConfigError(f"{variable}: must be {kind} number of seconds, got {raw!r}")
    return value


def _boolean(variable: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{variable}: must be true or false, got {raw!r}")


def _packages(raw: str) -> tuple[str, ...]:
    names = tuple(p for p in re.split(r"[\s,]+", raw) if p)
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", name):
            raise ConfigError(f"NIXERY_BASE_PACKAGES: {name!r} is not a package attribute name")
    return names


IDENTITY = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?(/[a-z0-9]+([._/-][a-z0-9]+)*)?")


def _identities(raw: str) -> tuple[str, ...]:
    """NIXERY_SIGNING_IDENTITY: registry hosts (``host[:port]``, with an optional path
    prefix), comma-separated."""
    found = []
    for item in (part.strip().rstrip("/") for part in raw.split(",")):
        if not item:
            continue
        if not IDENTITY.fullmatch(item):
            raise ConfigError(f"NIXERY_SIGNING_IDENTITY: {item!r} is not a registry host[:port][/path]")
        found.append(item)
    return tuple(found)


def _platforms(variable: str, raw: str) -> tuple[Arch, ...]:
    found: list[Arch] = []
    for item in (p.strip().lower() for p in raw.split(",")):
        if not item:
            continue
        if item not in PLATFORMS:
            raise ConfigError(
                f"{variable}: unknown platform {item!r}; known: linux/amd64, linux/arm64"
            )
        if PLATFORMS[item] not in found:
            found.append(PLATFORMS[item])
    return tuple(found)


@dataclass(frozen=True)
class Config:
    """Everything nixeryd is configured with."""

    listen: tuple[str, ...] = ("tcp:8080",)
    source: PackageSource = ChannelSource("nixos-unstable")
    storage_backend: str = "filesystem"
    storage_path: str = "var"
    gcs_bucket: str | None = None
    google_credentials: str | None = None
    gcs_signing_key: str | None = None
    gcs_signing_account: str | None = None
    s3_bucket: str | None = None
    aws_region: str = "us-east-1"
    s3_presigned_urls: bool = True
    access_log: bool = True
    signed_url_ttl: int = 300
    storage_emulator_host: str | None = None
    storage_connect_timeout: float = 5.0
    storage_deadline: float = 15.0
    storage_cooldown: float = 10.0
    signing_service_account: str | None = None
    image_signing_key: str | None = None
    image_signing_identity: tuple[str, ...] = ()
    iam_endpoint: str | None = None
    nix_timeout: float = 60.0
    build_deadline: float = 3600.0
    failure_ttl: float = 60.0
    path_recheck: float = 1.0
    lease_ttl: float = 60.0
    popularity_url: str | None = None
    base_packages: tuple[str, ...] = DEFAULT_BASE_PACKAGES
    layer_budget: int = 94
    cache_ttl: float = 6 * 3600.0
    max_builds: int = 2
    build_queue: int = 64
    nix_dir: str | None = None
    platforms: tuple[Arch, ...] = ()
    layer_compression: str = "gzip"
    htpasswd: str | None = None
    tokens_file: str | None = None
    child_environment: Mapping[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("--listen: at least one endpoint is needed")
        if self.storage_backend not in BACKENDS:
            raise ConfigError(
                f"NIXERY_STORAGE_BACKEND: must be one of {', '.join(BACKENDS)}, "
                f"got {self.storage_backend!r}"
            )
        if self.storage_backend == "gcs" and not self.gcs_bucket:
            raise ConfigError("GCS_BUCKET: must be set when NIXERY_STORAGE_BACKEND is gcs")
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ConfigError("S3_BUCKET: must be set when NIXERY_STORAGE_BACKEND is s3")
        if bool(self.gcs_signing_key) != bool(self.gcs_signing_account):
            raise ConfigError("GCS_SIGNING_KEY, GCS_SIGNING_ACCOUNT: set both or neither")
        if self.layer_compression not in ("gzip", "zstd"):
            raise ConfigError(
                f"NIXERY_LAYER_COMPRESSION: must be gzip or zstd, got {self.layer_compression!r}"
            )
        if not 1 <= self.signed_url_ttl <= 604800:
            raise ConfigError(
                f"NIXERY_SIGNED_URL_TTL: must be between 1 and 604800 seconds, got {self.signed_url_ttl}"
            )
        if not (0 < self.storage_connect_timeout <= self.storage_deadline and math.isfinite(self.storage_deadline)):
            raise ConfigError(
                "NIXERY_STORAGE_CONNECT_TIMEOUT, NIXERY_STORAGE_DEADLINE: must be positive numbers of seconds, "
                f"the connect timeout no longer than the deadline, got {self.storage_connect_timeout!r} and "
                f"{self.storage_deadline!r}"
            )
        if self.image_signing_key is not None and not self.image_signing_identity:
            raise ConfigError(
                "NIXERY_SIGNING_IDENTITY: must be set with NIXERY_SIGNING_KEY: the registry host (or hosts, "
                "comma-separated) clients pull by, e.g. registry.internal:8080"
            )
        if self.signing_service_account is not None and self.gcs_signing_key is not None:
            raise ConfigError("NIXERY_SIGNING_ACCOUNT, GCS_SIGNING_KEY: set one or the other")
        if not (self.nix_timeout >= 1 and math.isfinite(self.nix_timeout)):
            raise ConfigError(f"NIX_TIMEOUT: must be at least 1 second, got {self.nix_timeout!r}")
        if not (self.build_deadline > 0 and math.isfinite(self.build_deadline)):
            raise ConfigError(
                f"NIXERY_BUILD_DEADLINE: must be a positive number of seconds, got {self.build_deadline!r}"
            )
        if not (self.failure_ttl >= 0 and math.isfinite(self.failure_ttl)):
            raise ConfigError(
                f"NIXERY_FAILURE_TTL: must be zero or a positive number of seconds, got {self.failure_ttl!r}"
            )
        if not (self.lease_ttl >= 1 and math.isfinite(self.lease_ttl)):
            raise ConfigError(
                f"NIXERY_BUILD_LEASE_TTL: must be at least 1 second, got {self.lease_ttl!r}"
            )
        if not 2 <= self.layer_budget <= 125:
            raise ConfigError(f"NIXERY_LAYER_BUDGET: must be between 2 and 125, got {self.layer_budget}")
        if self.max_builds < 1:
            raise ConfigError(f"NIXERY_MAX_BUILDS: must be at least 1, got {self.max_builds}")
        if self.build_queue < 0:
            raise ConfigError(f"NIXERY_BUILD_QUEUE: must be at least 0, got {self.build_queue}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, cwd: str = ".", cpu_count: int = 2) -> Config:
        """The settings in ``environ``; relative paths are taken against ``cwd``."""

        def raw(variable: str) -> str | None:
            if variable not in READABLE:
                raise KeyError(f"{variable} is read but not listed in nixeryd.settings")
            return environ.get(variable)

        def get(variable: str) -> str | None:
            value = raw(variable)
            return value if value not in (None, "") else None

        def parsed(variable: str, parse: Callable[[str, str], T], default: T | None = None) -> T:
            """The setting, checked by ``parse``; when unset, its default: the one the
            book documents (nixeryd.settings), checked by the same ``parse``, unless the
            default is not a value (the number of cores) and is given here."""
            given = get(variable)
            if given is not None:
                return parse(variable, given)
            return default if default is not None else parse(variable, documented_default(variable))

        def absolute(path: str) -> str:
            return os.path.normpath(os.path.join(cwd, path))

        port = parsed("PORT", lambda v, raw: _int(v, raw, 1, 65535))
        channel, repo, path = get("NIXERY_CHANNEL"), get("NIXERY_PKGS_REPO"), get("NIXERY_PKGS_PATH")
        flake = get("NIXERY_PKGS_FLAKE")
        chosen = [name for name, value in [("NIXERY_CHANNEL", channel), ("NIXERY_PKGS_REPO", repo),
                                           ("NIXERY_PKGS_FLAKE", flake), ("NIXERY_PKGS_PATH", path)] if value]
        if len(chosen) > 1:
            raise ConfigError(f"{', '.join(chosen)}: set at most one package source")
        source: PackageSource
        if path:
            source = PathSource(absolute(path))
        elif repo:
            source = GitSource(repo)
        elif flake:
            if not FLAKE_REF.fullmatch(flake):
                raise ConfigError(f"NIXERY_PKGS_FLAKE: must be a flake reference (git+https://…, git+ssh://…, "
                                  f"git+file:///…, github:owner/repo, path:/…, an http(s) tarball), got {flake!r}")
            source = FlakeSource(flake)
        else:
            channel_url = get("NIXERY_CHANNEL_URL") or CHANNEL_URL
            if not channel_url.startswith(("http://", "https://", "file://")):
                raise ConfigError(f"NIXERY_CHANNEL_URL: must be an http(s) or file URL, got {channel_url!r}")
            source = ChannelSource(channel or "nixos-unstable", channel_url)
        raw_base = raw("NIXERY_BASE_PACKAGES")
        credentials = get("GOOGLE_APPLICATION_CREDENTIALS")
        signing_key = get("GCS_SIGNING_KEY")
        emulator = get("STORAGE_EMULATOR_HOST")
        if emulator is not None and "://" not in emulator:
            emulator = "http://" + emulator
        nix_dir = get("NIXERY_NIX_DIR")
        # Under socket activation (nixeryd.socket) systemd hands over the socket.
        if get("LISTEN_FDS") is not None and get("PORT") is None:
            listen: tuple[str, ...] = ("systemd:domain=INET:index=0",)
        else:
            listen = (f"tcp:{port}",)
        return cls(
            listen=listen,
            source=source,
            storage_backend=get("NIXERY_STORAGE_BACKEND") or "filesystem",
            storage_path=absolute(get("STORAGE_PATH") or "var"),
            gcs_bucket=get("GCS_BUCKET"),
            google_credentials=absolute(credentials) if credentials else None,
            gcs_signing_key=absolute(signing_key) if signing_key else None,
            gcs_signing_account=get("GCS_SIGNING_ACCOUNT"),
            s3_bucket=get("S3_BUCKET"),
            aws_region=get("AWS_REGION") or get("AWS_DEFAULT_REGION") or "us-east-1",
            s3_presigned_urls=parsed("S3_USE_PRESIGNED_URLS", _boolean),
            access_log=parsed("NIXERY_ACCESS_LOG", _boolean),
            signed_url_ttl=parsed("NIXERY_SIGNED_URL_TTL", lambda v, raw: _int(v, raw, 1, 604800)),
            storage_emulator_host=emulator.rstrip("/") if emulator else None,
            storage_connect_timeout=parsed("NIXERY_STORAGE_CONNECT_TIMEOUT", _seconds),
            storage_deadline=parsed("NIXERY_STORAGE_DEADLINE", _seconds),
            storage_cooldown=parsed("NIXERY_STORAGE_COOLDOWN", _seconds),
            signing_service_account=get("NIXERY_SIGNING_ACCOUNT"),
            image_signing_key=absolute(image_key) if (image_key := get("NIXERY_SIGNING_KEY")) else None,
            image_signing_identity=_identities(get("NIXERY_SIGNING_IDENTITY") or ""),
            iam_endpoint=parsed("NIXERY_IAM_ENDPOINT", lambda v, raw: raw.rstrip("/")),
            nix_timeout=parsed("NIX_TIMEOUT", _seconds),
            build_deadline=parsed("NIXERY_BUILD_DEADLINE", _seconds),
            failure_ttl=parsed("NIXERY_FAILURE_TTL", lambda v, raw: _seconds(v, raw, zero=True)),
            lease_ttl=parsed("NIXERY_BUILD_LEASE_TTL", _seconds),
            path_recheck=parsed("NIXERY_PATH_RECHECK", lambda v, raw: _seconds(v, raw, zero=True)),
            popularity_url=get("NIX_POPULARITY_URL"),
            base_packages=DEFAULT_BASE_PACKAGES if raw_base is None else _packages(raw_base),
            layer_budget=parsed("NIXERY_LAYER_BUDGET", lambda v, raw: _int(v, raw, 2, 125)),
            cache_ttl=parsed("NIXERY_CACHE_TTL", _seconds),
            max_builds=parsed("NIXERY_MAX_BUILDS", lambda v, raw: _int(v, raw, 1), max(1, cpu_count)),
            build_queue=parsed("NIXERY_BUILD_QUEUE", lambda v, raw: _int(v, raw, 0)),
            nix_dir=absolute(nix_dir) if nix_dir else None,
            platforms=parsed("NIXERY_PLATFORMS", _platforms, ()),
            layer_compression=(get("NIXERY_LAYER_COMPRESSION") or "gzip").lower(),
            htpasswd=absolute(htpasswd) if (htpasswd := get("NIXERY_HTPASSWD")) else None,
            tokens_file=absolute(tokens) if (tokens := get("NIXERY_TOKENS_FILE")) else None,
            child_environment=dict(environ),
        )

    def with_overrides(self, **changes: Any) -> Config:
        """These settings with some replaced, checked by the same rules."""
        return dataclasses.replace(self, **changes)
