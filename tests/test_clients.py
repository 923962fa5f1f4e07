"""Real registry clients pull from a running nixeryd serving multi-platform images:
skopeo (inspect and copy, unpacked with umoci), podman, containerd's ctr, and a
minimal client that takes only Docker schema 2."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.daemon import Daemon, daemon_environment, drain, terminate

IMAGE = "shell/hello"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    storage = tmp_path_factory.mktemp("storage")
    env = daemon_environment(storage, NIXERY_PLATFORMS="linux/amd64,linux/arm64")
    d = Daemon(storage, env).start()
    yield d
    d.stop()


def run(*args: str, timeout: float = 300) -> str:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_skopeo_inspect_lists_tags_and_platforms(daemon: Daemon) -> None:
    """skopeo inspect works without --no-tags and picks each platform from the index."""
    ref = f"docker://{daemon.registry}/{IMAGE}"
    default = json.loads(run("skopeo", "inspect", "--tls-verify=false", ref))
    assert "latest" in default["RepoTags"]
    assert default["Architecture"] == "amd64"
    arm = json.loads(run("skopeo", "inspect", "--tls-verify=false", "--override-arch", "arm64", ref))
    assert arm["Architecture"] == "arm64"


def test_skopeo_copy_and_umoci_unpack_run(daemon: Daemon, tmp_path: Path) -> None:
    """skopeo copies the image to an OCI layout; umoci unpacks it; its program runs."""
    layout = tmp_path / "layout"
    run("skopeo", "copy", "--src-tls-verify=false",
        f"docker://{daemon.registry}/{IMAGE}:latest", f"oci:{layout}:hello")
    bundle = tmp_path / "bundle"
    run("umoci", "unpack", "--image", f"{layout}:hello", str(bundle))
    assert run("chroot", str(bundle / "rootfs"), "/bin/hello").strip() == "Hello from nixeryd"
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"] == ["bash"]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: podman refuses a run root over 50 characters."""
    path = Path(tempfile.mkdtemp(prefix="pm", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_podman_pull_and_run(daemon: Daemon, tmp_path: Path, short_tmp: Path) -> None:
    """podman pulls the image into its own store, reports its architecture and runs it."""
    podman = ["podman", "--root", str(tmp_path / "root"), "--runroot", str(short_tmp),
              "--storage-driver", "vfs"]
    run(*podman, "pull", "--tls-verify=false", f"{daemon.registry}/{IMAGE}:latest")
    info = json.loads(run(*podman, "image", "inspect", f"{daemon.registry}/{IMAGE}:latest"))
    assert info[0]["Architecture"] == "amd64"
    assert info[0]["Config"]["Cmd"] == ["bash"]
    # Limits below the sandbox's own: podman's defaults for root exceed what runc may set here.
    output = run(*podman, "run", "--rm", "--network", "none",
                 "--ulimit", "nproc=1024:1024", "--ulimit", "nofile=1024:1024",
                 f"{daemon.registry}/{IMAGE}:latest", "hello")
    assert output.strip() == "Hello from nixeryd"


@dataclass
class Containerd:
    """A containerd daemon of the test's own, on a private socket."""

    root: Path
    process: subprocess.Popen[bytes] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    output: list[str] = field(default_factory=list)

    @property
    def socket(self) -> str:
        return str(self.root / "containerd.sock")

    def start(self) -> "Containerd":
        config = self.root / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.root / "root"}"\n'
            f'state = "{self.root / "state"}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{self.socket}"\n'
        )
        self.process = subprocess.Popen(
            ["containerd", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        drain(self.process, self.output, self.ready, "containerd successfully booted")
        assert self.ready.wait(60), "containerd did not start:\n" + "".join(self.output)
        return self

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)

    def ctr(self, *args: str) -> str:
        return run("ctr", "--address", self.socket, *args)


@pytest.fixture
def containerd(tmp_path: Path) -> Iterator[Containerd]:
    c = Containerd(tmp_path).start()
    yield c
    c.stop()


def test_containerd_pulls_by_head_then_digest_and_runs(daemon: Daemon, containerd: Containerd) -> None:
    """ctr pulls over plain HTTP (HEAD on the tag, then GET by digest) and runs the image."""
    ref = f"{daemon.registry}/{IMAGE}:latest"
    start = len(daemon.output)
    containerd.ctr("images", "pull", "--plain-http", "--snapshotter", "native", ref)
    requests = [line for line in daemon.output[start:] if f"/v2/{IMAGE}/manifests/" in line]
    assert any(f'"HEAD /v2/{IMAGE}/manifests/latest' in line for line in requests), requests
    assert any(f'"GET /v2/{IMAGE}/manifests/sha256:' in line for line in requests), requests
    output = containerd.ctr("run", "--rm", "--snapshotter", "native", ref, "hello-test", "hello")
    assert output.strip() == "Hello from nixeryd"


def test_docker_schema2_only_client(daemon: Daemon, tmp_path: Path) -> None:
    """A client that takes only Docker schema 2 gets it and can fetch and check every blob."""
    request = urllib.request.Request(
        f"{daemon.url}/v2/{IMAGE}/manifests/latest", headers={"Accept": DOCKER_MANIFEST}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        body = response.read()
        assert response.headers["Content-Type"] == DOCKER_MANIFEST
        assert response.headers["Docker-Content-Digest"] == "sha256:" + hashlib.sha256(body).hexdigest()
    manifest = json.loads(body)
    assert manifest["mediaType"] == DOCKER_MANIFEST
    rootfs = tmp_path / "rootfs"
    rootfs.mkdir()
    for descriptor in [manifest["config"], *manifest["layers"]]:
        with urllib.request.urlopen(f"{daemon.url}/v2/{IMAGE}/blobs/{descriptor['digest']}") as blob:
            data = blob.read()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == descriptor["digest"]
        if descriptor is not manifest["config"]:
            subprocess.run(["tar", "-xzf", "-", "-C", str(rootfs)], input=data, check=True)
    assert run("chroot", str(rootfs), "/bin/hello").strip() == "Hello from nixeryd"
