"""Every setting nixeryd reads: its name (as the Go Nixery spells it, where Nixery has
it), the ``twistd nixeryd`` option that overrides it, its default and its meaning. The
one list the settings reference is made from (``reference``), and the only names
``nixeryd.config`` may read: reading a setting not listed here fails at once. Pure.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Setting:
    """One row of the reference: the variables it covers (several where they go
    together), its option, its default and its meaning, in Markdown."""

    variables: str  # as shown: `NAME`, or several, comma-separated
    option: str
    default: str
    meaning: str
    read_by_others: bool = False  # read by a library nixeryd uses, not by nixeryd itself

    @property
    def names(self) -> tuple[str, ...]:
        """The variable names of the row (an ellipsis for "and the like" left out)."""
        return tuple(n.strip().strip("`") for n in self.variables.split(",") if n.strip().strip("`") not in ("", "…"))


SETTINGS: tuple[Setting, ...] = (
    Setting(
        '`PORT`',
        '`--listen ENDPOINT` (repeatable)',
        '`8080`',
        ('where to listen; `--listen` takes Twisted endpoint strings (`tcp:8080:interface=127.0.0.1`, '
         '`unix:/run/nixeryd.sock`, `ssl:443:privateKey=…`, `systemd:domain=INET:index=0`)'),
    ),
    Setting(
        '`NIXERY_CHANNEL`',
        '`--channel`',
        '`nixos-unstable`',
        'nixpkgs channel, or a 40-hex nixpkgs commit (then images are cached for good)',
    ),
    Setting(
        '`NIXERY_PKGS_REPO`',
        '`--pkgs-repo`',
        '—',
        'git repository of the package set; the tag is a ref or a 40-hex revision (`latest` is HEAD)',
    ),
    Setting(
        '`NIXERY_CHANNEL_URL`',
        '—',
        '`https://github.com/NixOS/nixpkgs/archive/{channel}.tar.gz`',
        ("where a channel's or commit's tarball is fetched, `{channel}` standing for `NIXERY_CHANNEL`: an "
         'internal mirror'),
    ),
    Setting(
        '`NIXERY_PKGS_FLAKE`',
        '`--pkgs-flake`',
        '—',
        ('a flake as the package set (`git+https://…`, `git+ssh://…`, `git+file:///…`, '
         '`github:owner/repo`, `path:/…`, a tarball URL): names resolve in its `packages.<system>`, then '
         '`legacyPackages.<system>`; for a git or forge flake naming no ref of its own, the tag is a ref '
         'or a 40-hex revision (`latest` the default branch), and images of a revision are cached for good'),
    ),
    Setting(
        '`NIXERY_PKGS_PATH`',
        '`--pkgs-path`',
        '—',
        ('local path of the package set; at most one of `NIXERY_CHANNEL`, `NIXERY_PKGS_REPO`, '
         '`NIXERY_PKGS_FLAKE` and `NIXERY_PKGS_PATH` may be set'),
    ),
    Setting(
        '`NIXERY_PATH_RECHECK`',
        '—',
        '`1`',
        ("seconds within which pulls share one look at a path source's files (see [Package "
         'sets](package-sources.md#package-sets)); `0` looks at every pull'),
    ),
    Setting(
        '`NIXERY_STORAGE_BACKEND`',
        '—',
        '`filesystem`',
        'where blobs are kept: `filesystem`, `gcs` or `s3`',
    ),
    Setting(
        '`STORAGE_PATH`',
        '`--storage-path`',
        '`./var`',
        ('directory of the filesystem backend; with `gcs` or `s3`, local scratch space for layers being '
         'uploaded'),
    ),
    Setting(
        '`GCS_BUCKET`',
        '—',
        '—',
        'the bucket of the `gcs` backend (required with it)',
    ),
    Setting(
        '`GOOGLE_APPLICATION_CREDENTIALS`',
        '—',
        '—',
        "service-account JSON: the client's credentials, and the key that signs blob URLs",
    ),
    Setting(
        '`GCS_SIGNING_KEY`, `GCS_SIGNING_ACCOUNT`',
        '—',
        '—',
        "a PEM RSA key and its service account's e-mail, to sign blob URLs with instead",
    ),
    Setting(
        '`S3_BUCKET`',
        '—',
        '—',
        'the bucket of the `s3` backend (required with it)',
    ),
    Setting(
        '`AWS_REGION`, `AWS_DEFAULT_REGION`',
        '—',
        '`us-east-1`',
        "the bucket's region (`AWS_DEFAULT_REGION` is read when it is unset)",
    ),
    Setting(
        '`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, …',
        '—',
        "the AWS SDK's chain",
        ('the endpoint (MinIO, Ceph, R2, …) and credentials, as every AWS SDK reads them: variables, '
         'profiles, instance or pod roles'), read_by_others=True,
    ),
    Setting(
        '`S3_USE_PRESIGNED_URLS`',
        '—',
        '`true`',
        "`false` for a public bucket: blobs redirect to the objects' plain URLs",
    ),
    Setting(
        '`NIXERY_ACCESS_LOG`',
        '—',
        '`true`',
        ("`false` leaves out the log line of every request (each costs about a sixth of a warm pull's "
         'time); `/metrics` counts requests either way'),
    ),
    Setting(
        '`NIXERY_SIGNED_URL_TTL`',
        '—',
        '`300`',
        'seconds a signed (GCS) or presigned (S3) blob URL stays valid',
    ),
    Setting(
        '`NIXERY_SIGNING_KEY`',
        '—',
        '—',
        ('a PEM ECDSA P-256 private key (SEC1 or PKCS #8): every image is signed in the sigstore format '
         '(see [Signed images](security.md#signed-images))'),
    ),
    Setting(
        '`NIXERY_SIGNING_IDENTITY`',
        '—',
        '— (required with `NIXERY_SIGNING_KEY`)',
        ('the registry host the signatures name (`registry.internal:8080`), as clients pull it; several, '
         "comma-separated, when clients pull by more than one name (the request's `Host` picks among them,"
         ' else the first is used)'),
    ),
    Setting(
        '`NIXERY_SIGNING_ACCOUNT`',
        '—',
        '—',
        ("sign blob URLs as this service account through IAM `signBlob` with the workload's own "
         'credentials, with no key file (GKE, Cloud Run); needs `roles/iam.serviceAccountTokenCreator` on '
         'the account'),
    ),
    Setting(
        '`NIXERY_IAM_ENDPOINT`',
        '—',
        '`https://iamcredentials.googleapis.com`',
        'the IAM Credentials API to call for `signBlob` (a private endpoint)',
    ),
    Setting(
        '`NIXERY_STORAGE_CONNECT_TIMEOUT`',
        '—',
        '`5`',
        'seconds to connect to the bucket',
    ),
    Setting(
        '`NIXERY_STORAGE_DEADLINE`',
        '—',
        '`15`',
        ('seconds one bucket call may take, retries included (plus a second per 10 MB moved); past it the '
         'pull is a `503`'),
    ),
    Setting(
        '`NIXERY_STORAGE_COOLDOWN`',
        '—',
        '`10`',
        ('after 5 bucket failures in a row, seconds calls are refused at once (a quick `503`) before one '
         'is let through to probe'),
    ),
    Setting(
        '`STORAGE_EMULATOR_HOST`',
        '—',
        '—',
        ('a GCS emulator (`http://host:port`; the scheme is added when missing); client and redirects go '
         'there'),
    ),
    Setting(
        '`NIX_TIMEOUT`',
        '`--nix-timeout`',
        '`60`',
        "seconds one derivation's build may take (`--timeout` of Nix, as in Nixery)",
    ),
    Setting(
        '`NIXERY_BUILD_DEADLINE`',
        '—',
        '`3600`',
        ('seconds a whole build (fetching the package set, evaluating, substituting, building) may take '
         'before its process group is killed'),
    ),
    Setting(
        '`NIXERY_FAILURE_TTL`',
        '—',
        '`60`',
        ('seconds a failed build is remembered and answered without running Nix again, by every instance '
         'on the same storage (a name not in the package set: by the instance that looked it up, nothing '
         'written to storage); `0` turns it off'),
    ),
    Setting(
        '`NIXERY_BUILD_LEASE_TTL`',
        '—',
        '`60`',
        ('seconds a build lease lasts unless renewed (the holder renews it every third of that): how soon '
         'another instance takes over the build of one that died'),
    ),
    Setting(
        '`NIX_POPULARITY_URL`',
        '`--popularity`',
        '—',
        ('popularity data for layering (JSON object package name → count), a URL or a file, loaded once at'
         ' start-up (30 s limit; a failure stops start-up)'),
    ),
    Setting(
        '`NIXERY_BASE_PACKAGES`',
        '—',
        '`cacert,iana-etc`',
        'packages every image holds (comma- or space-separated; empty for none)',
    ),
    Setting(
        '`NIXERY_LAYER_BUDGET`',
        '—',
        '`94`',
        'most layers in an image, the symlink layer included (2–125)',
    ),
    Setting(
        '`NIXERY_CACHE_TTL`',
        '—',
        '`21600`',
        'seconds an image of a moving package source stays cached',
    ),
    Setting(
        '`NIXERY_MAX_BUILDS`',
        '—',
        'number of cores',
        'Nix builds run at once',
    ),
    Setting(
        '`NIXERY_BUILD_QUEUE`',
        '—',
        '`64`',
        'builds that may wait behind the running ones',
    ),
    Setting(
        '`NIXERY_NIX_DIR`',
        '—',
        'the bundled `nix/`',
        'the Nix expressions nixeryd evaluates',
    ),
    Setting(
        '`NIX_CONFIG`, `NIX_CONF_DIR`, `NIX_REMOTE`, `NIX_SSHOPTS`, `GIT_SSH_COMMAND`, …',
        '—',
        "the host's",
        ("Nix's own settings and the tools it calls, for the Nix processes nixeryd starts (they get its "
         "whole environment): `NIX_CONFIG` comes after nixeryd's download timeouts, so it can change them "
         '(binary caches, remote builders: see [On an internal '
         'network](package-sources.md#on-an-internal-network) and [Running a '
         "fleet](running.md#running-a-fleet)); where the host has no `nix.conf`, nixeryd's own "
         '`etc/nix/nix.conf` is used'), read_by_others=True,
    ),
    Setting(
        '`NIXERY_LAYER_COMPRESSION`',
        '—',
        '`gzip`',
        ('`zstd` for `tar+zstd` layers: faster to pack and smaller, for OCI clients that take them '
         "(containerd, podman, skopeo); clients that take only Docker schema 2 then get 404, and Docker's "
         "engine before 23.0 cannot unpack them (Debian 12's `docker.io` 20.10 fails with `failed to "
         'register layer: ApplyLayer exit status 1 … unexpected EOF`; other 20.10 builds with '
         '`archive/tar: invalid tar header`): keep `gzip` where Docker engines pull'),
    ),
    Setting(
        '`NIXERY_HTPASSWD`',
        '—',
        '—',
        'htpasswd file (bcrypt, `htpasswd -B`, or `{SHA}`): `/v2/` then needs HTTP basic auth',
    ),
    Setting(
        '`NIXERY_TOKENS_FILE`',
        '—',
        '—',
        'file of static bearer tokens, one a line: `/v2/` then takes `Authorization: Bearer <token>`',
    ),
    Setting(
        '`NIXERY_PLATFORMS`',
        '—',
        '—',
        ('e.g. `linux/amd64,linux/arm64`: every tag is a multi-platform index of one image per platform '
         '(names starting with `arm64/` stay single-platform)'),
    ),
)

NAMES: frozenset[str] = frozenset(name for setting in SETTINGS for name in setting.names)
READABLE: frozenset[str] = NAMES | {"LISTEN_FDS"}
"""What ``nixeryd.config`` may read: the settings, and systemd's socket activation."""


def reference() -> str:
    """The settings as a Markdown table."""
    rows = ["| variable | option | default | meaning |", "| --- | --- | --- | --- |"]
    rows += [f"| {s.variables} | {s.option} | {s.default} | {s.meaning} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"


def documented_default(variable: str) -> str:
    """The default the reference gives ``variable``, as a value (```60``` is ``60``);
    nixeryd.config parses it as it parses the setting, so the reference cannot say one
    default while the code has another."""
    setting = next(s for s in SETTINGS if variable in s.names)
    value = setting.default
    if not (value.startswith("`") and value.endswith("`") and value.count("`") == 2):
        raise KeyError(f"{variable}: its documented default ({value}) is not a value")
    return value[1:-1]
