"""Image names, tags and digests: the registry grammar and nixeryd's meaning of it.

Pure: no I/O, no Twisted.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    """A target platform: Nix's system name and the OCI architecture name."""

    nix_system: str  # "x86_64-linux"
    oci: str  # "amd64"


AMD64 = Arch("x86_64-linux", "amd64")
ARM64 = Arch("aarch64-linux", "arm64")


@dataclass(frozen=True)
class Image:
    """What a client asked for, after meta-packages and base packages were applied."""

    name: str  # the registry name as requested, e.g. "shell/git/htop"
    packages: tuple[str, ...]  # sorted and de-duplicated; includes meta expansion and base packages
    arch: Arch
    shell: bool  # the image has a shell: Cmd is ["bash"]


class NameInvalid(ValueError):
    """The repository name breaks the registry grammar (400 NAME_INVALID)."""


class ReferenceInvalid(ValueError):
    """The tag or digest breaks the registry grammar (400/404 with a registry error)."""
