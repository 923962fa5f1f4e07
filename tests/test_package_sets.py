"""End to end, through the real daemon and real Nix: the rules for package sets shaped
like the ones teams really have (tests/pkgs copies nixpkgs' shapes where nixeryd depends
on them; tests/pkgs/system-only is a team's own `{ system }:` set)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.daemon import PKGS, Daemon, daemon_environment, git_package_set


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The daemon runs with a HOME whose ~/.config/nixpkgs would change what nixpkgs builds."""
    storage = tmp_path_factory.mktemp("storage")
    home = tmp_path_factory.mktemp("home")
    (home / ".config" / "nixpkgs").mkdir(parents=True)
    (home / ".config" / "nixpkgs" / "config.nix").write_text("{ allowUnfree = true; }")
    (home / ".config" / "nixpkgs" / "overlays.nix").write_text("[ (self: super: { }) ]")
    d = Daemon(storage, daemon_environment(storage, HOME=str(home))).start()
    yield d
    d.stop()


def manifest_of(daemon: Daemon, name: str, tag: str = "latest") -> dict[str, Any]:
    status, _, body = daemon.request(f"/v2/{name}/manifests/{tag}")
    assert status == 200, body
    manifest: dict[str, Any] = json.loads(body)
    return manifest


def blob(daemon: Daemon, name: str, digest: str) -> bytes:
    status, _, body = daemon.request(f"/v2/{name}/blobs/{digest}")
    assert status == 200
    return body


def layer_files(daemon: Daemon, name: str) -> list[dict[str, bytes | None]]:
    """Each layer of the image, in manifest order: entry name -> content (None if not a file)."""
    layers = []
    for layer in manifest_of(daemon, name)["layers"]:
        with tarfile.open(fileobj=io.BytesIO(blob(daemon, name, layer["digest"])), mode="r:gz") as tar:
            files = {}
            for member in tar.getmembers():
                f = tar.extractfile(member) if member.isfile() else None
                files[member.name] = f.read() if f else None
            layers.append(files)
    return layers


def layer_names(daemon: Daemon, name: str) -> list[list[str]]:
    """The entry names of each layer of the image, in manifest order."""
    return [list(files) for files in layer_files(daemon, name)]


def config_of(daemon: Daemon, name: str, tag: str = "latest") -> dict[str, Any]:
    config: dict[str, Any] = json.loads(blob(daemon, name, manifest_of(daemon, name, tag)["config"]["digest"]))
    return config


def test_capitals_and_nested_sets(daemon: Daemon) -> None:
    """`sdl2` finds `SDL2`; `python3packages.requests` reaches into a nested set that carries
    `recurseForDerivations`, as nixpkgs' package sets do."""
    layers = layer_names(daemon, "sdl2/python3packages.requests")
    entries = [name for layer in layers for name in layer]
    assert any(name.endswith("-SDL2-2.28/lib/libSDL2.txt") for name in entries), entries
    assert any(name.endswith("-python3-requests-2.31/lib/python3/requests.py") for name in entries)


def test_a_removed_alias_is_422_with_nix_message(daemon: Daemon) -> None:
    """A name whose attribute throws is 422 MANIFEST_UNKNOWN naming it, Nix's own words first
    in the message (and in the reason phrase), and in the detail."""
    status, _, body = daemon.request("/v2/hello/oldtool/manifests/latest")
    assert status == 422
    (error,) = json.loads(body)["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN"
    assert error["message"].startswith("'oldtool' has been removed from the test package set")
    assert error["detail"]["packages"] == ["oldtool"]
    assert "'oldtool' has been removed from the test package set" in error["detail"]["nix"]


def test_only_the_default_output_goes_in(daemon: Daemon) -> None:
    """A package whose meta.outputsToInstall also lists its man output brings only `out`."""
    entries = [name for layer in layer_names(daemon, "manual-tool") for name in layer]
    assert any(name.endswith("-manual-tool-1.0/bin/manual-tool") for name in entries)
    assert not any("/share/man/" in name or name.endswith("-man") for name in entries), entries


def test_base_packages_lead_by_identity_not_name(daemon: Daemon) -> None:
    """cacert is `nss-cacert-3.92` here, as in nixpkgs: its layer still comes first, ahead
    of more popular and bigger layers, and the symlink layer is last."""
    layers = layer_names(daemon, "big/alpha")
    first = " ".join(layers[0])
    assert "-nss-cacert-3.92" in first or "-iana-etc-" in first, layers[0]
    base_layers = [i for i, names in enumerate(layers)
                   if any("-nss-cacert-3.92" in n or "-iana-etc-" in n for n in names)]
    assert base_layers == list(range(len(base_layers)))
    assert any(name.endswith("bin/alpha") and not name.startswith("nix/") for name in layers[-1])


def test_the_image_reads_the_set_it_was_given(daemon: Daemon) -> None:
    """nixpkgs-shaped sets are called with an empty config and no overlays, whatever the
    daemon's ~/.config/nixpkgs says."""
    reports = [content for files in layer_files(daemon, "config-report")
               for name, content in files.items() if name.startswith("nix/store/")
               and name.endswith("share/config.json")]
    assert len(reports) == 1 and reports[0] is not None
    assert json.loads(reports[0]) == {"config": {}, "overlays": 0}


@pytest.fixture
def team_daemon(tmp_path: Path) -> Iterator[Daemon]:
    storage = tmp_path / "storage"
    d = Daemon(storage, daemon_environment(storage, NIXERY_PKGS_PATH=str(PKGS / "system-only"))).start()
    yield d
    d.stop()


def test_a_set_taking_system_alone(team_daemon: Daemon, tmp_path: Path) -> None:
    """A team's `{ system }:` set, which refuses `config` and `overlays`, serves images that run."""
    names = [n for layer in layer_names(team_daemon, "team-tool") for n in layer]
    assert "bin/team-tool" in names, names
    status, _, body = team_daemon.request("/v2/arm64/team-tool/manifests/latest")
    assert status == 200, body
    assert json.loads(blob(team_daemon, "arm64/team-tool", json.loads(body)["config"]["digest"]))[
        "architecture"] == "arm64"


@pytest.fixture
def git_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, str, str]]:
    """A daemon on a git repository of the test set: (daemon, url, revision of HEAD)."""
    url, rev = git_package_set(tmp_path / "pkgs.git")
    storage = tmp_path / "storage"
    env = daemon_environment(storage, NIXERY_PKGS_REPO=url)
    del env["NIXERY_PKGS_PATH"]
    d = Daemon(storage, env).start()
    yield d, url, rev
    d.stop()


def test_images_name_their_source_and_revision(git_daemon: tuple[Daemon, str, str]) -> None:
    """An image from a git set carries the repository and the revision Nix fetched as
    OCI labels, at HEAD and at a pinned revision; `created` is fixed."""
    daemon, url, rev = git_daemon
    for tag in ("latest", rev):
        config = config_of(daemon, "hello", tag)
        assert config["config"]["Labels"] == {
            "org.opencontainers.image.source": url, "org.opencontainers.image.revision": rev}
        assert config["created"] == "1970-01-01T00:00:01Z"


def test_links_out_of_the_store_stay_links(daemon: Daemon) -> None:
    """A package linking to /etc, ../../../var and /nix puts those links in the image,
    never the host's files; a jdk-shaped bin/ link merges with the other packages' bin/."""
    layers = layer_files(daemon, "hostile-links/jdk-like/hello")
    top = layers[-1]
    for name in ("up", "nixroot", "bin/shadow"):
        assert name in top and top[name] is None, name
    assert {"bin/java", "bin/hello"} <= set(top)
    # etc/ merges the base packages' real directories and the account files; the host's
    # /etc adds nothing.
    assert {n for n in top if n.startswith("etc/")} == {
        "etc/ssl", "etc/ssl/certs", "etc/ssl/certs/ca-bundle.crt", "etc/protocols", "etc/services",
        "etc/passwd", "etc/group", "etc/nsswitch.conf"}
    every = [name for files in layers for name in files]
    assert not any(name.startswith(("up/", "nixroot/", "nix/var")) for name in every), every
    assert not any("shadow" in name and not name.startswith("nix/store/") and name != "bin/shadow"
                   for name in every)
