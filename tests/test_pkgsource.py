"""Package sources: what Nix is handed, what is pinned, what keys a cache."""
from __future__ import annotations

from nixeryd.build.pkgsource import ChannelSource, GitSource, PathSource

REV = "a" * 40


def test_channel() -> None:
    """A channel name moves; a channel commit is pinned; the tag is ignored."""
    moving = ChannelSource("nixos-unstable")
    github = "https://github.com/NixOS/nixpkgs/archive/"
    assert moving.nix_source("v1") == {"type": "channel", "channel": "nixos-unstable",
                                       "url": github + "nixos-unstable.tar.gz"}
    assert not moving.pinned(REV)
    assert moving.identity("a") == moving.identity("b")
    pinned = ChannelSource(REV)
    assert pinned.nix_source("latest") == {"type": "channel", "rev": REV, "url": github + REV + ".tar.gz"}
    assert pinned.pinned("latest")


def test_channel_from_a_mirror() -> None:
    """NIXERY_CHANNEL_URL: ``{channel}`` stands for the channel or commit; another URL is
    another source for cache keys."""
    mirror = ChannelSource("nixos-24.05", "https://mirror.internal/nixpkgs/{channel}/nixexprs.tar.xz")
    assert mirror.nix_source("latest")["url"] == "https://mirror.internal/nixpkgs/nixos-24.05/nixexprs.tar.xz"
    assert mirror.identity("latest") != ChannelSource("nixos-24.05").identity("latest")
    assert "mirror.internal" in mirror.describe()


def test_git_tags() -> None:
    """latest is HEAD, a 40-hex tag is a revision, anything else a ref."""
    source = GitSource("https://git.internal/pkgs.git")
    assert source.nix_source("latest") == {"type": "git", "url": source.url}
    assert source.nix_source(REV) == {"type": "git", "url": source.url, "rev": REV}
    assert source.nix_source("release-1") == {"type": "git", "url": source.url, "ref": "release-1"}
    assert source.pinned(REV) and not source.pinned("release-1") and not source.pinned("latest")
    assert source.identity("a") != source.identity("b")


def test_path() -> None:
    """A path is never pinned and ignores the tag."""
    source = PathSource("/srv/pkgs")
    assert source.nix_source("x") == {"type": "path", "path": "/srv/pkgs"}
    assert not source.pinned(REV)
    assert source.identity("a") == source.identity("b") == "path:/srv/pkgs"
    assert "/srv/pkgs" in source.describe()
