"""Flakes as package sets (NIXERY_PKGS_FLAKE): a local git flake, offline; names resolve
in ``packages.<system>`` before ``legacyPackages.<system>``; the tag is a ref or a
revision, ``latest`` the default branch."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from nixeryd.build.pkgsource import FlakeSource
from nixeryd.config import Config, ConfigError
from tests.daemon import Daemon, daemon_environment, git_package_set
from tests.test_package_sets import config_of

FLAKE = """{
  description = "nixeryd's test package set as a flake";
  outputs = { self }:
    let set = import ./. { }; in {
      legacyPackages.x86_64-linux = set;
      # packages come first: `git` here is the set's hello.
      packages.x86_64-linux.git = set.hello;
    };
}
"""


def git_flake(where: Path) -> tuple[str, str, str]:
    """The test set as a git flake on branches main and release: its URL, main's revision
    and release's."""
    url, _ = git_package_set(where)
    git = ["git", "-C", str(where), "-c", "user.email=t@t", "-c", "user.name=t"]
    revisions = []
    for branch in ("release", "main"):
        subprocess.run([*git, "checkout", "-q", branch], check=True)
        (where / "flake.nix").write_text(FLAKE)
        subprocess.run([*git, "add", "flake.nix"], check=True)
        subprocess.run([*git, "commit", "-qm", "a flake"], check=True)
        revisions.append(subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                                        text=True).stdout.strip())
    return "git+" + url, revisions[1], revisions[0]


@pytest.fixture(scope="module")
def flake_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, str, str, str]]:
    root = tmp_path_factory.mktemp("flake")
    ref, main, release = git_flake(root / "pkgs")
    storage = root / "storage"
    env = daemon_environment(storage, NIXERY_PKGS_FLAKE=ref)
    del env["NIXERY_PKGS_PATH"]
    daemon = Daemon(storage, env).start()
    yield daemon, ref, main, release
    daemon.stop()


def test_names_resolve_in_packages_then_legacy_packages(flake_daemon: tuple[Daemon, str, str, str]) -> None:
    daemon, ref, main, _ = flake_daemon
    # `git` is the flake's packages.git (the set's hello, whose main program is hello).
    config = config_of(daemon, "run/git")
    assert config["config"]["Entrypoint"][0].endswith("-hello/bin/hello")
    assert config["config"]["Labels"]["org.opencontainers.image.revision"] == main
    # `htop` comes from legacyPackages.
    status, _, body = daemon.request("/v2/htop/manifests/latest")
    assert status == 200, body
    status, _, body = daemon.request("/v2/no-such-package/manifests/latest")
    assert status == 404 and b"no-such-package" in body, body


def test_tags_are_refs_and_revisions(flake_daemon: tuple[Daemon, str, str, str]) -> None:
    """`release` is the branch, a revision is that commit; `latest` is the default branch."""
    daemon, _, main, release = flake_daemon
    assert config_of(daemon, "hello", "release")["config"]["Labels"][
        "org.opencontainers.image.revision"] == release
    assert config_of(daemon, "hello", main)["config"]["Labels"]["org.opencontainers.image.revision"] == main
    status, headers, _ = daemon.request(f"/v2/hello/manifests/{release}")
    assert status == 200
    assert headers["Docker-Content-Digest"] == daemon.request("/v2/hello/manifests/release")[1][
        "Docker-Content-Digest"]
    assert headers["Docker-Content-Digest"] != daemon.request("/v2/hello/manifests/latest")[1][
        "Docker-Content-Digest"]


def test_flake_references() -> None:
    """How a tag joins a flake reference; what is pinned for good; what names a source."""
    git = FlakeSource("git+https://git.internal/pkgs.git")
    assert git.nix_source("latest") == {"type": "flake", "ref": "git+https://git.internal/pkgs.git"}
    assert git.flake_ref("release") == "git+https://git.internal/pkgs.git?ref=release"
    assert git.flake_ref("a" * 40) == "git+https://git.internal/pkgs.git?rev=" + "a" * 40
    assert git.pinned("a" * 40) and not git.pinned("release") and not git.pinned("latest")
    assert git.labels("a" * 40, None) == {"org.opencontainers.image.source": "https://git.internal/pkgs.git",
                                          "org.opencontainers.image.revision": "a" * 40}
    forge = FlakeSource("github:example/pkgs?dir=sub")
    assert forge.flake_ref("v1") == "github:example/pkgs/v1?dir=sub"
    assert forge.browsable() == "https://github.com/example/pkgs"
    fixed = FlakeSource("git+ssh://git@git.internal/pkgs?rev=" + "b" * 40)
    assert fixed.flake_ref("release") == fixed.ref and fixed.pinned("latest")
    assert not FlakeSource("path:/srv/pkgs").pinned("latest")
    assert FlakeSource("github:example/pkgs/main").flake_ref("v1") == "github:example/pkgs/main"
    # Credentials in a reference never reach a label or a log line.
    assert "token" not in FlakeSource("git+https://user:token@git.internal/p.git").describe()


@pytest.mark.parametrize("ref", ["pkgs", "flake:nixpkgs", "path:relative", "git+https://x y", "-Xfoo"])
def test_a_bad_flake_reference_is_one_clear_line(ref: str) -> None:
    with pytest.raises(ConfigError, match="NIXERY_PKGS_FLAKE: must be a flake reference"):
        Config.from_env({"NIXERY_PKGS_FLAKE": ref}, cwd="/")


def test_one_source_at_most() -> None:
    with pytest.raises(ConfigError, match="NIXERY_PKGS_FLAKE, NIXERY_PKGS_PATH: set at most one"):
        Config.from_env({"NIXERY_PKGS_FLAKE": "path:/srv/p", "NIXERY_PKGS_PATH": "/srv/p"}, cwd="/")
