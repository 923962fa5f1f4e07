"""Image names, tags and digests: the registry grammar and nixeryd's meaning of it.

Pure: no I/O, no Twisted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Arch:
    """A target platform: Nix's system name and the OCI architecture name."""

    nix_system: str  # "x86_64-linux"
    oci: str  # "amd64"


AMD64 = Arch("x86_64-linux", "amd64")
ARM64 = Arch("aarch64-linux", "arm64")


@dataclass(frozen=True)
class ImageSpec:
    """What a client asked for, after meta-packages and base packages were applied."""

    name: str  # the registry name as requested, e.g. "shell/git/htop"
    packages: tuple[str, ...]  # sorted and de-duplicated; includes meta expansion and base packages
    arch: Arch
    shell: bool  # the image has a shell: Cmd is ["bash"]
    base: tuple[str, ...] = ()  # the configured base packages, also in ``packages``
    nonroot: bool = False  # runs as user and group nonroot, 65532:65532
    run: bool = False  # Entrypoint is the first package's meta.mainProgram
    first: str | None = None  # the first package named after the meta-packages
    canonical: str = ""  # one spelling of every name asking for this image (``canonical_name``)

    @property
    def spelling(self) -> str:
        """The name tags are recorded under: the canonical one, when parsed."""
        return self.canonical or self.name


class NameInvalid(ValueError):
    """The repository name breaks the registry grammar (400 NAME_INVALID)."""


class ReferenceInvalid(ValueError):
    """The tag or digest breaks the registry grammar (400/404 with a registry error)."""


class TagInvalid(ReferenceInvalid):
    """A tag outside the registry grammar."""


class DigestInvalid(ReferenceInvalid):
    """A digest that is not ``sha256:`` and 64 lowercase hex digits (400 DIGEST_INVALID)."""


@dataclass(frozen=True)
class Tag:
    value: str


@dataclass(frozen=True)
class Digest:
    hex: str

    @property
    def digest(self) -> str:
        return "sha256:" + self.hex


MAX_NAME_LENGTH = 255
DEFAULT_BASE_PACKAGES: tuple[str, ...] = ("cacert", "iana-etc")
SHELL_PACKAGES: tuple[str, ...] = ("bashInteractive", "coreutils", "moreutils", "nano")
META_PACKAGES: tuple[str, ...] = ("shell", "arm64", "nonroot", "run")
"""Components with a meaning of their own, only at the front of a name, in any order."""

_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
"""The distribution spec's path component: ``a.b``, ``a_b``, ``a__b``, ``a-b``, ``a--b``."""
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[a-f0-9]{64}")
_ALGORITHM = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")


def parse_name(name: str, base_packages: Sequence[str] = DEFAULT_BASE_PACKAGES) -> ImageSpec:
    """The image a repository name asks for; ``NameInvalid`` if it breaks the grammar."""
    if not name:
        raise NameInvalid("the repository name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(f"the repository name is longer than {MAX_NAME_LENGTH} characters")
    components = name.split("/")
    for component in components:
        if not _COMPONENT.fullmatch(component):
            shown = component if component.isprintable() else repr(component)
            raise NameInvalid(
                f"invalid path component {shown!r}: components are lowercase letters and digits, "
                "separated by single '.', '_' or '-'"
            )
    meta: set[str] = set()
    rest = components
    while rest and rest[0] in META_PACKAGES:
        meta.add(rest[0])
        rest = rest[1:]
    if "run" in meta and not rest:
        raise NameInvalid("run/ needs a package after it, whose main program the image runs")
    packages = set(rest) | set(base_packages)
    if "shell" in meta:
        packages |= set(SHELL_PACKAGES)
    first = rest[0] if rest else None
    return ImageSpec(name=name, packages=tuple(sorted(packages)), arch=ARM64 if "arm64" in meta else AMD64,
                 shell="shell" in meta, base=tuple(sorted(set(base_packages))),
                 nonroot="nonroot" in meta, run="run" in meta, first=first,
                 canonical=canonical_name(meta, rest))


def canonical_name(meta: set[str] | frozenset[str], packages: Sequence[str]) -> str:
    """One spelling for every name that asks for the same image: meta-packages in their
    fixed order, then (after ``run/``) the package whose program runs, then the other
    packages sorted, each once. ``htop/git``, ``git/htop`` and ``git/git/htop`` are one
    repository in the tags and the catalogue, so that respelling a name writes nothing."""
    ordered = [m for m in META_PACKAGES if m in meta]
    rest = list(packages)
    if "run" in meta and rest:
        ordered.append(rest[0])
        rest = [p for p in rest if p != rest[0]]
    return "/".join(ordered + sorted(set(rest)))


def parse_digest(value: str) -> Digest:
    """A ``sha256:<hex>`` digest; ``DigestInvalid`` for anything else."""
    algorithm, sep, hexdigest = value.partition(":")
    if not sep or not _ALGORITHM.fullmatch(algorithm):
        raise DigestInvalid("invalid digest: expected sha256:<64 hex digits>")
    if algorithm != "sha256":
        raise DigestInvalid(f"unsupported digest algorithm {algorithm!r}: only sha256 is served")
    if not _SHA256.fullmatch(hexdigest):
        raise DigestInvalid("invalid sha256 digest: expected 64 lowercase hex digits")
    return Digest(hexdigest)


def parse_reference(ref: str) -> Tag | Digest:
    """A manifest reference: a digest when it has a ':', else a tag."""
    if ":" in ref:
        return parse_digest(ref)
    if not _TAG.fullmatch(ref):
        raise TagInvalid(
            "invalid tag: up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'"
        )
    return Tag(ref)
