"""The registry clients the end-to-end tests drive, run for real: skopeo, podman,
containerd's ctr (with a containerd of the test's own) and Docker's engine and CLI
(with a dockerd of the test's own)."""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.daemon import ServerProcess

# Debian's docker.io (installed by `make install`), named in full: another docker CLI may
# come first on PATH.
DOCKER = "/usr/bin/docker"
DOCKERD = "/usr/sbin/dockerd"
def run(*args: str, timeout: float = 300) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def attempt(*args: str, timeout: float = 300) -> tuple[int, str]:
    """A client run that may fail: its exit code and everything it printed."""
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    return result.returncode, result.stdout + result.stderr


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: podman refuses a run root over 50 characters."""
    path = Path(tempfile.mkdtemp(prefix="pm", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass(kw_only=True)
class Service(ServerProcess):
    """A client-side daemon of the test's own (containerd, dockerd)."""

    root: Path
    command: list[str]

    def start(self) -> Service:
        self.spawn(self.command)
        return self


def containerd(root: Path) -> Service:
    socket = root / "containerd.sock"
    config = root / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{root / "root"}"\n'
        f'state = "{root / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{socket}"\n'
    )
    return Service(root=root, command=["containerd", "--config", str(config)],
                   marker="containerd successfully booted")


def dockerd(root: Path) -> Service:
    """dockerd as a sandbox allows it: vfs storage, no iptables, no bridge (containers run
    with --network none), its own data root, exec root and socket. Loopback registries are
    insecure (plain HTTP) by Docker's own default."""
    return Service(root=root, marker="API listen on", command=[
        DOCKERD, "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
        "--pidfile", str(root / "docker.pid"), "--host", f"unix://{root / 'docker.sock'}",
        "--storage-driver", "vfs", "--iptables=false", "--ip6tables=false", "--bridge=none",
    ])


@pytest.fixture
def containerd_service(tmp_path: Path) -> Iterator[Service]:
    service = containerd(tmp_path).start()
    yield service
    service.stop()


def ctr(service: Service, *args: str) -> str:
    return run("ctr", "--address", str(service.root / "containerd.sock"), *args)


@pytest.fixture(scope="module")
def docker() -> Iterator[list[str]]:
    """A dockerd of the test's own; yields the docker command line that talks to it."""
    root = Path(tempfile.mkdtemp(prefix="dk", dir="/tmp"))  # short: unix socket paths are bounded
    service = dockerd(root)
    try:
        service.start()
        yield [DOCKER, "--config", str(root / "client"), "--host", f"unix://{root / 'docker.sock'}"]
    finally:
        service.stop()
        # dockerd bind-mounts its data root onto itself and leaves the mount behind
        mounts = Path("/proc/self/mounts").read_text().split("\n")
        if any(line.split(" ")[1:2] == [str(root / "data")] for line in mounts):
            subprocess.run(["umount", "--recursive", str(root / "data")], check=False)
        shutil.rmtree(root, ignore_errors=True)
