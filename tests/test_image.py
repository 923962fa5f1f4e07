"""The container image (``make image``): built from Debian's packages, loaded into the
dockerd the tests run, started with no arguments but settings in its environment, it
serves images skopeo pulls, as the non-root user ``nixeryd``, with the digests nixeryd
gives outside a container."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.clients import docker  # noqa: F401 (a fixture)
from tests.daemon import PKGS, ROOT, Daemon, daemon_environment, free_port, git_package_set, manifest_digest
from tests.remote_builder import RemoteBuilder

IMAGE = ROOT / "build" / "nixeryd-image.tar"


@pytest.fixture(scope="module")
def image() -> Path:
    made = subprocess.run(["make", "-C", str(ROOT), "image"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=1800)
    assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
    return IMAGE


@pytest.fixture
def running(docker: list[str], image: Path, tmp_path: Path) -> Iterator[tuple[list[str], int, Path]]:  # noqa: F811
    """The image running with the test package set mounted: docker's command line, the
    port, the package set's directory."""
    loaded = subprocess.run([*docker, "load", "-i", str(image)], capture_output=True, text=True)
    assert loaded.returncode == 0 and "nixeryd:latest" in loaded.stdout, loaded.stderr
    pkgs = tmp_path / "pkgs"
    shutil.copytree(PKGS, pkgs)
    tmp_path.chmod(0o755)
    port = free_port()
    # The sandbox's dockerd has no bridge: the container shares the host's network.
    started = subprocess.run([
        *docker, "run", "-d", "--name", "nixeryd-image-test", "--network", "host", "-e", f"PORT={port}",
        "-e", "NIXERY_PKGS_PATH=/pkgs", "-v", f"{pkgs}:/pkgs:ro",
        # The test set's programs are the host's static busybox.
        "-v", "/bin/busybox:/bin/busybox:ro", "nixeryd:latest"], capture_output=True, text=True)
    assert started.returncode == 0, started.stderr
    try:
        yield docker, port, pkgs
    finally:
        logs = subprocess.run([*docker, "logs", "nixeryd-image-test"], capture_output=True, text=True)
        print(logs.stdout[-5000:], logs.stderr[-5000:])
        subprocess.run([*docker, "rm", "-f", "nixeryd-image-test"], capture_output=True)


def healthy(port: int, within: float = 60) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            time.sleep(0.5)
    return False


def test_the_image_serves_what_nixeryd_serves(running: tuple[list[str], int, Path], tmp_path: Path) -> None:
    client, port, pkgs = running
    assert healthy(port)
    pulled = subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://127.0.0.1:{port}/hello:latest",
                             f"oci:{tmp_path / 'out'}:hello"], capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    inspected = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://127.0.0.1:{port}/hello:latest"],
                               capture_output=True, text=True, check=True)
    in_container = json.loads(inspected.stdout)["Digest"]

    user = subprocess.run([*client, "exec", "nixeryd-image-test", "id", "-u"], capture_output=True, text=True)
    assert user.stdout.strip() == "10001"
    config = json.loads(subprocess.run([*client, "inspect", "nixeryd:latest"], capture_output=True, text=True,
                                       check=True).stdout)[0]["Config"]
    assert config["User"] == "nixeryd" and "/var/lib/nixeryd" in config["Volumes"]
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/docs/settings.html", timeout=10) as book:
        assert b"<code>NIXERY_CHANNEL</code>" in book.read()

    # The same image built outside the container, on the same package set: the same digest.
    storage = tmp_path / "storage"
    outside = Daemon(storage, daemon_environment(storage, NIXERY_PKGS_PATH=str(pkgs))).start()
    try:
        assert manifest_digest(outside, "hello") == in_container
    finally:
        outside.stop()


def test_a_private_package_set_over_ssh(docker: list[str], image: Path, tmp_path: Path) -> None:  # noqa: F811
    """NIXERY_PKGS_REPO over SSH from inside the container, with nothing but a mounted key
    and GIT_SSH_COMMAND: Nix's fetchGit calls the image's git, which calls its ssh."""
    server = RemoteBuilder(tmp_path / "git-server").start()  # an sshd on loopback, here serving git
    try:
        _, rev = git_package_set(tmp_path / "pkgs.git")
        secrets = tmp_path / "secrets"
        secrets.mkdir()
        shutil.copy(server.root / "client_key", secrets / "id_ed25519")
        for path in (secrets, secrets / "id_ed25519"):
            os.chown(path, 10001, 10001)  # the image's user; ssh refuses a key others can read
        tmp_path.chmod(0o755)
        loaded = subprocess.run([*docker, "load", "-i", str(image)], capture_output=True, text=True)
        assert loaded.returncode == 0, loaded.stderr
        port = free_port()
        ssh = ("ssh -i /run/secrets/nixeryd/id_ed25519 -o StrictHostKeyChecking=no "
               f"-o UserKnownHostsFile=/dev/null -p {server.port}")
        started = subprocess.run([
            *docker, "run", "-d", "--name", "nixeryd-ssh-test", "--network", "host", "-e", f"PORT={port}",
            "-e", f"NIXERY_PKGS_REPO=ssh://root@127.0.0.1{tmp_path / 'pkgs.git'}", "-e", f"GIT_SSH_COMMAND={ssh}",
            "-v", f"{secrets}:/run/secrets/nixeryd:ro", "-v", "/bin/busybox:/bin/busybox:ro", "nixeryd:latest"],
            capture_output=True, text=True)
        assert started.returncode == 0, started.stderr
        try:
            assert healthy(port)
            inspected = subprocess.run(
                ["skopeo", "inspect", "--tls-verify=false", f"docker://127.0.0.1:{port}/hello:latest"],
                capture_output=True, text=True, timeout=300)
            assert inspected.returncode == 0, inspected.stderr
            assert json.loads(inspected.stdout)["Labels"]["org.opencontainers.image.revision"] == rev
        finally:
            logs = subprocess.run([*docker, "logs", "nixeryd-ssh-test"], capture_output=True, text=True)
            print(logs.stdout[-5000:], logs.stderr[-5000:])
            subprocess.run([*docker, "rm", "-f", "nixeryd-ssh-test"], capture_output=True)
    finally:
        server.stop()
