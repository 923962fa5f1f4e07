"""Images people run in production: account files in every image, the nonroot and run
meta-packages, and signature tags that never build. End to end with real Nix, and run
with podman."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

from nixeryd.image.names import NameInvalid, parse_name
from tests.daemon import Daemon, daemon_fixture

daemon = daemon_fixture()


def test_meta_packages_combine_at_the_front() -> None:
    """nonroot and run combine with shell and arm64 in any order, only at the front; run
    needs a package after it."""
    image = parse_name("nonroot/run/shell/hello/git")
    assert (image.nonroot, image.run, image.shell, image.first) == (True, True, True, "hello")
    assert parse_name("run/nonroot/hello").first == "hello"
    late = parse_name("hello/nonroot")
    assert not late.nonroot and "nonroot" in late.packages
    with pytest.raises(NameInvalid, match="run/ needs a package"):
        parse_name("run/shell")


def pulled(daemon: Daemon, name: str) -> tuple[dict[str, Any], dict[str, tarfile.TarInfo], dict[str, bytes]]:
    """The image's config, and the entries and file contents of its last (symlink) layer."""
    status, _, body = daemon.request(f"/v2/{name}/manifests/latest")
    assert status == 200, body
    manifest = json.loads(body)
    config = json.loads(daemon.request(f"/v2/{name}/blobs/{manifest['config']['digest']}")[2])
    data = daemon.request(f"/v2/{name}/blobs/{manifest['layers'][-1]['digest']}")[2]
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        contents = {m.name: tar.extractfile(m).read() for m in members.values() if m.isfile()}  # type: ignore[union-attr]
    return config, members, contents


def test_every_image_has_account_files(daemon: Daemon) -> None:
    """root and nobody in /etc/passwd and /etc/group, and an nsswitch.conf; no User set."""
    config, members, contents = pulled(daemon, "hello")
    assert contents["etc/passwd"].decode().splitlines()[0].startswith("root:x:0:0:")
    assert "nobody:x:65534:65534:" in contents["etc/passwd"].decode()
    assert contents["etc/group"].decode().splitlines() == ["root:x:0:", "nobody:x:65534:"]
    assert b"passwd: files" in contents["etc/nsswitch.conf"]
    assert (members["etc/passwd"].uid, members["etc/passwd"].mode) == (0, 0o644)
    assert "User" not in config["config"]


def test_a_package_keeps_its_own_passwd(daemon: Daemon) -> None:
    """A package providing /etc/passwd keeps it: the image links to the package's file."""
    _, members, contents = pulled(daemon, "own-passwd")
    assert members["etc/passwd"].issym()
    assert members["etc/passwd"].linkname.endswith("-own-passwd-1.0/etc/passwd")
    assert "etc/group" in contents


def test_nonroot_images_run_as_65532(daemon: Daemon) -> None:
    """nonroot/ sets User 65532:65532 and adds the user, its group and a home it owns."""
    config, members, contents = pulled(daemon, "nonroot/shell/hello")
    assert config["config"]["User"] == "65532:65532"
    assert "nonroot:x:65532:65532:nonroot:/home/nonroot:/bin/sh" in contents["etc/passwd"].decode()
    assert "nonroot:x:65532:" in contents["etc/group"].decode()
    home = members["home/nonroot"]
    assert home.isdir() and (home.uid, home.gid) == (65532, 65532)


def test_run_sets_the_entrypoint(daemon: Daemon) -> None:
    """run/ makes the first package's meta.mainProgram the entrypoint; with a shell too, the
    entrypoint wins over bash as the command."""
    config, _, _ = pulled(daemon, "run/shell/hello")
    (entrypoint,) = config["config"]["Entrypoint"]
    assert entrypoint.startswith("/nix/store/") and entrypoint.endswith("-hello/bin/hello")
    assert "Cmd" not in config["config"]


def test_run_without_a_main_program_is_422(daemon: Daemon) -> None:
    """A package with no meta.mainProgram cannot be run/: 422 naming it, saying why (the
    name is in the set, and cannot become this image)."""
    status, _, body = daemon.request("/v2/run/git/manifests/latest")
    assert status == 422
    (error,) = json.loads(body)["errors"]
    assert error["code"] == "MANIFEST_UNKNOWN" and error["detail"]["packages"] == ["git"]
    assert "meta.mainProgram" in error["message"]


def test_signature_tags_never_build(daemon: Daemon) -> None:
    """sha256-<hex>.sig (and .att, .sbom) are lookups: 404, and Nix is not run for them."""
    start = len(daemon.output)
    for suffix in ("sig", "att", "sbom"):
        status, _, body = daemon.request(f"/v2/beta/manifests/sha256-{'a' * 64}.{suffix}")
        assert (status, daemon.error_codes(body)) == (404, ["MANIFEST_UNKNOWN"])
    assert not any("building beta" in line for line in daemon.output[start:])


def podman(root: Path, runroot: Path, *args: str) -> str:
    result = subprocess.run(["podman", "--root", str(root), "--runroot", str(runroot), "--storage-driver", "vfs",
                             *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_podman_runs_nonroot_and_run_images(daemon: Daemon, tmp_path: Path) -> None:
    """podman runs nonroot/ images as 65532 (id -u, id -g, whoami from /etc/passwd) and
    run/ images with no command given."""
    runroot = Path(tempfile.mkdtemp(prefix="pm", dir="/tmp"))  # podman wants a short run root
    try:
        limits = ["--ulimit", "nproc=1024:1024", "--ulimit", "nofile=1024:1024", "--network", "none", "--rm"]
        for name in ("nonroot/shell/hello", "nonroot/run/hello"):
            podman(tmp_path, runroot, "pull", "--tls-verify=false", f"{daemon.registry}/{name}:latest")
        ids = podman(tmp_path, runroot, "run", *limits, f"{daemon.registry}/nonroot/shell/hello:latest",
                     "sh", "-c", "id -u; id -g; whoami")
        assert ids.split() == ["65532", "65532", "nonroot"]
        ran = podman(tmp_path, runroot, "run", *limits, f"{daemon.registry}/nonroot/run/hello:latest")
        assert ran.strip() == "Hello from nixeryd"
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
