"""The registry grammar and what a name means."""
from __future__ import annotations

import pytest

from nixeryd.image.names import (
    AMD64,
    ARM64,
    SHELL_PACKAGES,
    Digest,
    DigestInvalid,
    NameInvalid,
    Tag,
    TagInvalid,
    parse_digest,
    parse_name,
    parse_reference,
)


@pytest.mark.parametrize(
    "name",
    ["git", "shell/git/htop", "python3packages.numpy", "a-b_c.d", "1password", "x/" * 100 + "y",
     "a__b", "a--b", "a---b", "a" * 255, "/".join(["ab"] * 85)],
)
def test_valid_names(name: str) -> None:
    """Names within the grammar parse."""
    assert parse_name(name).name == name


@pytest.mark.parametrize(
    "name",
    ["", "Git", "git/", "/git", "a//b", "a/../b", "..", "a..b", "-a", "a-", "a b", "a\x00b",
     "a\nb", "${pkgs}", "a:b", "é", "a" * 256, "git%2fhtop", "a/./b", "a___b", "a_-b", "a._b", "_a",
     "/".join(["ab"] * 86)],
)
def test_invalid_names(name: str) -> None:
    """Names outside the grammar are NameInvalid."""
    with pytest.raises(NameInvalid):
        parse_name(name)


def test_packages_sorted_deduplicated_with_base() -> None:
    """Order and repeats do not matter, and base packages are added."""
    one = parse_name("git/htop/git")
    other = parse_name("htop/git")
    assert one.packages == other.packages == ("cacert", "git", "htop", "iana-etc")
    assert one.arch == AMD64 and not one.shell


def test_meta_packages_at_the_front() -> None:
    """shell and arm64 at the front are meta-packages, in any order."""
    image = parse_name("arm64/shell/git")
    assert image.arch == ARM64 and image.shell
    assert set(SHELL_PACKAGES) <= set(image.packages) and "git" in image.packages
    assert "shell" not in image.packages and "arm64" not in image.packages
    assert parse_name("shell/arm64/git").packages == image.packages


def test_meta_names_later_are_packages() -> None:
    """shell or arm64 after a package is an ordinary package name."""
    image = parse_name("git/shell/arm64")
    assert image.arch == AMD64 and not image.shell
    assert {"shell", "arm64"} <= set(image.packages)


def test_only_meta_packages() -> None:
    """A name of only meta-packages gives the shell image."""
    image = parse_name("shell")
    assert image.shell and "bashInteractive" in image.packages


def test_base_packages_configurable() -> None:
    """The base packages come from the caller."""
    assert parse_name("git", ()).packages == ("git",)
    assert parse_name("git", ("zlib",)).packages == ("git", "zlib")


@pytest.mark.parametrize("tag", ["latest", "v1.0", "_x", "A" * 128, "a-b_c.d"])
def test_valid_tags(tag: str) -> None:
    """Tags within the grammar parse as tags."""
    assert parse_reference(tag) == Tag(tag)


@pytest.mark.parametrize("tag", ["", ".x", "-x", "A" * 129, "a/b", "a b", "a\x00", "ä"])
def test_invalid_tags(tag: str) -> None:
    """Tags outside the grammar are TagInvalid."""
    with pytest.raises(TagInvalid):
        parse_reference(tag)


def test_digests() -> None:
    """sha256 with 64 lowercase hex digits is the only digest served."""
    hexdigest = "0123456789abcdef" * 4
    assert parse_reference("sha256:" + hexdigest) == Digest(hexdigest)
    assert parse_digest("sha256:" + hexdigest).digest == "sha256:" + hexdigest
    for bad in ["sha256:" + hexdigest.upper(), "sha256:" + hexdigest[:-1], "sha512:" + hexdigest * 2,
                "sha256:", ":" + hexdigest, "sha256:" + hexdigest + "\n", "md5:abc"]:
        with pytest.raises(DigestInvalid):
            parse_digest(bad)
    with pytest.raises(DigestInvalid, match="only sha256"):
        parse_digest("sha512:" + hexdigest * 2)
