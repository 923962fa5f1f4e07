"""Where packages come from: a nixpkgs channel or commit, a git repository, a flake, a path.

Each source says what to hand the Nix expression, whether an image built from
it at a tag can be cached for good, and what identifies it in cache keys. Pure.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol
from urllib.parse import parse_qs, quote, urlsplit, urlunsplit

_REV = re.compile(r"[0-9a-f]{40}")
NIXPKGS_URL = "https://github.com/NixOS/nixpkgs"
CHANNEL_URL = NIXPKGS_URL + "/archive/{channel}.tar.gz"
"""Where a channel's or commit's tarball is fetched (``NIXERY_CHANNEL_URL``)."""
SOURCE_LABEL = "org.opencontainers.image.source"
REVISION_LABEL = "org.opencontainers.image.revision"


def _labels(source: str | None, revision: str | None) -> dict[str, str]:
    labels = {}
    if source:
        labels[SOURCE_LABEL] = source
    if revision:
        labels[REVISION_LABEL] = revision
    return labels


def public_url(url: str) -> str:
    """``url`` without the user name or password it may carry (``https://user:token@host/``)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def is_rev(value: str) -> bool:
    """A full 40-hex git commit."""
    return _REV.fullmatch(value) is not None


class PackageSource(Protocol):
    def nix_source(self, tag: str) -> dict[str, str]:
        """The source as handed to nix/build.nix (``--argstr source <json>``)."""

    def pinned(self, tag: str) -> bool:
        """Whether the package set at ``tag`` can never change."""

    def identity(self, tag: str) -> str:
        """What the package set at ``tag`` is, for cache keys."""

    def describe(self) -> str:
        """One line for people."""

    def labels(self, tag: str, revision: str | None) -> dict[str, str]:
        """The image labels naming the package set at ``tag`` and ``revision``, the
        git revision Nix fetched where it knows one."""


@dataclass(frozen=True)
class ChannelSource:
    """A nixpkgs channel (``nixos-unstable``) or commit; the tag is ignored. Its tarball
    is fetched from ``url``, where ``{channel}`` stands for the channel or commit."""

    channel: str
    url: str = CHANNEL_URL

    def nix_source(self, tag: str) -> dict[str, str]:
        url = self.url.replace("{channel}", self.channel)
        if is_rev(self.channel):
            return {"type": "channel", "rev": self.channel, "url": url}
        return {"type": "channel", "channel": self.channel, "url": url}

    def pinned(self, tag: str) -> bool:
        return is_rev(self.channel)

    def identity(self, tag: str) -> str:
        # A mirror of the default URL serves the same tarballs: only another URL template
        # is another source.
        suffix = "" if self.url == CHANNEL_URL else "@" + self.url
        return "channel:" + self.channel + suffix

    def describe(self) -> str:
        kind = "nixpkgs commit" if is_rev(self.channel) else "nixpkgs channel"
        return f"{kind} {self.channel} from {public_url(self.url.replace('{channel}', self.channel))}"

    def labels(self, tag: str, revision: str | None) -> dict[str, str]:
        return _labels(NIXPKGS_URL, revision or (self.channel if is_rev(self.channel) else None))


@dataclass(frozen=True)
class GitSource:
    """A git repository; the tag is a ref, a 40-hex revision, or ``latest`` for HEAD."""

    url: str

    def nix_source(self, tag: str) -> dict[str, str]:
        if tag == "latest":
            return {"type": "git", "url": self.url}
        if is_rev(tag):
            return {"type": "git", "url": self.url, "rev": tag}
        return {"type": "git", "url": self.url, "ref": tag}

    def pinned(self, tag: str) -> bool:
        return is_rev(tag)

    def identity(self, tag: str) -> str:
        return f"git:{self.url}@{tag}"

    def describe(self) -> str:
        return f"git repository {public_url(self.url)} (tags are refs or revisions)"

    def labels(self, tag: str, revision: str | None) -> dict[str, str]:
        return _labels(public_url(self.url), revision or (tag if is_rev(tag) else None))


@dataclass(frozen=True)
class PathSource:
    """A package set on local disk: a moving target, never cached for good."""

    path: str

    def nix_source(self, tag: str) -> dict[str, str]:
        return {"type": "path", "path": self.path}

    def pinned(self, tag: str) -> bool:
        return False

    def identity(self, tag: str) -> str:
        return "path:" + self.path

    def describe(self) -> str:
        return f"local package set {self.path}"

    def labels(self, tag: str, revision: str | None) -> dict[str, str]:
        return {}  # a path on the build machine names nothing a reader could fetch


FORGES = {"github:": "https://github.com/", "gitlab:": "https://gitlab.com/", "sourcehut:": "https://git.sr.ht/"}
FLAKE_REF = re.compile(r"(git\+(https?|ssh|file)://|github:|gitlab:|sourcehut:|path:/|tarball\+https?://|https?://)\S+")
"""The flake references nixeryd takes: git, forges, absolute paths and tarballs."""


@dataclass(frozen=True)
class FlakeSource:
    """A flake; names are looked up in its ``packages.<system>``, then its
    ``legacyPackages.<system>``. A git or forge flake whose reference names no ref or
    revision of its own takes the tag as one (``latest``: its default branch); any other
    flake is what its reference says, whatever the tag."""

    ref: str

    @cached_property  # the warm path asks for an identity on every pull
    def takes_tags(self) -> bool:
        if self.ref.startswith(tuple(FORGES)):
            return self.ref.split(":", 1)[1].split("?", 1)[0].count("/") == 1  # owner/repo alone
        if self.ref.startswith("git+"):
            query = parse_qs(urlsplit(self.ref).query)
            return "ref" not in query and "rev" not in query
        return False

    def flake_ref(self, tag: str) -> str:
        """The reference Nix is handed for ``tag``."""
        if tag == "latest" or not self.takes_tags:
            return self.ref
        if self.ref.startswith(tuple(FORGES)):
            base, _, query = self.ref.partition("?")
            return f"{base}/{quote(tag, safe='')}" + (f"?{query}" if query else "")
        return f"{self.ref}{'&' if '?' in self.ref else '?'}{'rev' if is_rev(tag) else 'ref'}={quote(tag, safe='')}"

    def nix_source(self, tag: str) -> dict[str, str]:
        return {"type": "flake", "ref": self.flake_ref(tag)}

    def pinned(self, tag: str) -> bool:
        if self.takes_tags:
            return is_rev(tag)
        query = parse_qs(urlsplit(self.ref).query)
        return is_rev(query.get("rev", [""])[0])

    def identity(self, tag: str) -> str:
        return f"flake:{self.flake_ref(tag)}"

    def describe(self) -> str:
        tags = " (tags are refs or revisions)" if self.takes_tags else ""
        return f"flake {public_url(self.ref)}{tags}"

    def labels(self, tag: str, revision: str | None) -> dict[str, str]:
        return _labels(self.browsable(), revision or (tag if self.takes_tags and is_rev(tag) else None))

    def browsable(self) -> str | None:
        """Where a reader finds the flake's source, where its reference says."""
        for prefix, site in FORGES.items():
            if self.ref.startswith(prefix):
                return site + "/".join(self.ref[len(prefix):].split("?", 1)[0].split("/")[:2])
        if self.ref.startswith(("git+https://", "git+http://")):
            return public_url(urlunsplit(urlsplit(self.ref.removeprefix("git+"))._replace(query="")))
        return None
