"""Real registry clients pull from a running nixeryd serving multi-platform images:
skopeo (inspect and copy, unpacked with umoci), podman, containerd's ctr, Docker's
engine and CLI, and a minimal client that takes only Docker schema 2."""
from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.request
import zlib
from pathlib import Path

from tests.clients import Service, ctr, run
from tests.daemon import Daemon, daemon_fixture

IMAGE = "shell/hello"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


daemon = daemon_fixture(NIXERY_PLATFORMS="linux/amd64,linux/arm64")


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
    # Layers are gzip members a block each: the shell's layer (busybox, 2 MB) is several,
    # and what umoci unpacked of it is whole.
    blobs = layout / "blobs" / "sha256"
    assert max(gzip_members((blobs / layer.removeprefix("sha256:")).read_bytes())
               for layer in _layers(layout)) > 4
    shell = next((bundle / "rootfs" / "nix" / "store").glob("*-busybox-1.35/bin/busybox"))
    assert shell.read_bytes() == Path("/bin/busybox").read_bytes()
    config = json.loads((bundle / "config.json").read_text())
    assert config["process"]["args"] == ["bash"]


def gzip_members(data: bytes) -> int:
    """How many gzip members ``data`` holds, read one after another to its end."""
    count = 0
    while data:
        member = zlib.decompressobj(16 + zlib.MAX_WBITS)
        member.decompress(data)
        assert member.eof, "a gzip member is cut short"
        data, count = member.unused_data, count + 1
    return count


def _layers(layout: Path) -> list[str]:
    index = json.loads((layout / "index.json").read_text())
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / index["manifests"][0]["digest"].removeprefix("sha256:")).read_text())
    return [layer["digest"] for layer in manifest["layers"]]


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


def test_containerd_pulls_by_head_then_digest_and_runs(daemon: Daemon, containerd_service: Service) -> None:
    """ctr pulls over plain HTTP (HEAD on the tag, then GET by digest) and runs the image."""
    ref = f"{daemon.registry}/{IMAGE}:latest"
    start = len(daemon.output)
    ctr(containerd_service, "images", "pull", "--plain-http", "--snapshotter", "native", ref)
    requests = [line for line in daemon.output[start:] if f"/v2/{IMAGE}/manifests/" in line]
    assert any(f'"HEAD /v2/{IMAGE}/manifests/latest' in line for line in requests), requests
    assert any(f'"GET /v2/{IMAGE}/manifests/sha256:' in line for line in requests), requests
    output = ctr(containerd_service, "run", "--rm", "--snapshotter", "native", ref, "hello-test", "hello")
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


def test_docker_pull_and_run(daemon: Daemon, docker: list[str]) -> None:
    """Docker's engine pulls from the manifest list over plain HTTP and runs the image."""
    ref = f"{daemon.registry}/{IMAGE}:latest"
    run(*docker, "pull", ref)
    info = json.loads(run(*docker, "image", "inspect", ref))
    assert info[0]["Architecture"] == "amd64"
    assert info[0]["Config"]["Cmd"] == ["bash"]
    assert "/usr/bin" in info[0]["Config"]["Env"][0] or any(
        e.startswith("PATH=") and "/usr/local/bin" in e for e in info[0]["Config"]["Env"])
    output = run(*docker, "run", "--rm", "--network", "none", ref, "hello")
    assert output.strip() == "Hello from nixeryd"


def test_docker_pull_by_digest_of_another_image(daemon: Daemon, docker: list[str]) -> None:
    """An image pulled by digest (as Dockerfiles pin it) comes back with that digest."""
    status, headers, _ = daemon.request(
        "/v2/hello/manifests/latest", "HEAD",
        {"Accept": f"application/vnd.docker.distribution.manifest.list.v2+json, {DOCKER_MANIFEST}"})
    assert status == 200
    digest = headers["Docker-Content-Digest"]
    run(*docker, "pull", f"{daemon.registry}/hello@{digest}")
    info = json.loads(run(*docker, "image", "inspect", f"{daemon.registry}/hello@{digest}"))
    assert f"{daemon.registry}/hello@{digest}" in info[0]["RepoDigests"]


def test_docker_manifest_inspect_insecure(daemon: Daemon, docker: list[str]) -> None:
    """The docker CLI's own Go client first tries TLS on the plain port, reads the 400 it
    gets, falls back to HTTP and lists both platforms."""
    output = run(*docker, "manifest", "inspect", "--insecure", f"{daemon.registry}/{IMAGE}:latest")
    manifest = json.loads(output)
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert sorted(m["platform"]["architecture"] for m in manifest["manifests"]) == ["amd64", "arm64"]


def test_containerd_runs_nonroot_images_as_65532(daemon: Daemon, containerd_service: Service) -> None:
    """ctr runs a nonroot/ image as the user its config names."""
    ref = f"{daemon.registry}/nonroot/shell/hello:latest"
    ctr(containerd_service, "images", "pull", "--plain-http", "--snapshotter", "native", ref)
    output = ctr(containerd_service, "run", "--rm", "--snapshotter", "native", ref, "nonroot-test",
                 "sh", "-c", "id -u; id -g; whoami")
    assert output.split() == ["65532", "65532", "nonroot"]
