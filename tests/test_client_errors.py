"""Why a pull failed reaches what people read: the output of docker, podman, skopeo and
containerd's ctr, run for real against a real daemon building with real Nix.

Those clients print a registry error's message for 4xx statuses only, and for a 5xx only
the status line; ctr prints the status line alone. Each failure below must show its
reason in all four."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.clients import Service, attempt
from tests.daemon import Daemon, daemon_environment, free_port
from tests.processes import keep_for_session

CLIENTS = ["docker", "podman", "skopeo", "ctr"]


class StalledServer:
    """A TCP server on loopback that takes connections and never answers, as a network
    that stalls does."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = self.socket.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.held.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self.held:
            connection.close()


@pytest.fixture(scope="module")
def stalled() -> Iterator[StalledServer]:
    server = StalledServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory, stalled: StalledServer) -> Iterator[Callable[[str], Daemon]]:
    """Daemons started on first use, one for each way of configuring a failure."""
    closed_port = free_port()  # nothing listens there: connections are refused
    settings = {
        "main": {"NIX_TIMEOUT": "3"},
        "platforms": {"NIXERY_PLATFORMS": "linux/amd64,linux/arm64"},
        "deadline": {"NIX_TIMEOUT": "60", "NIXERY_BUILD_DEADLINE": "3"},
        "path": {"NIXERY_PKGS_PATH": "/nonexistent/pkgs"},
        "git": {"NIXERY_PKGS_PATH": "", "NIXERY_PKGS_REPO": f"http://127.0.0.1:{closed_port}/pkgs.git"},
        "channel": {"NIXERY_PKGS_PATH": "",
                    "NIXERY_CHANNEL_URL": f"http://127.0.0.1:{stalled.port}/archive/{{channel}}.tar.gz"},
    }
    started: dict[str, Daemon] = {}

    def get(kind: str) -> Daemon:
        if kind not in started:
            storage = tmp_path_factory.mktemp("storage-" + kind)
            env = daemon_environment(storage, NIXERY_FAILURE_TTL="600", **settings[kind])
            started[kind] = Daemon(storage, env).start()
            keep_for_session(started[kind])  # started within a test, kept for the module
        return started[kind]

    yield get
    for daemon in started.values():
        daemon.stop()


def pull(client: str, registry: str, image: str, docker: list[str], containerd: Service, root: Path) -> str:
    """What ``client`` prints when it pulls ``image``; it must fail."""
    ref = f"{registry}/{image}:latest"
    if client == "docker":
        command = [*docker, "pull", ref]
    elif client == "podman":
        command = ["podman", "--root", str(root / "podman"), "--runroot", str(root / "run"),
                   "--storage-driver", "vfs", "pull", "--tls-verify=false", ref]
    elif client == "skopeo":
        command = ["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"]
    else:
        command = ["ctr", "--address", str(containerd.root / "containerd.sock"), "images", "pull",
                   "--plain-http", "--snapshotter", "native", ref]
    code, output = attempt(*command)
    assert code != 0, output
    return output


CASES = [
    # (daemon, image, what each client must print)
    ("main", "broken", "cannot build broken-1.0: broken-1.0: this package is meant to fail to build"),
    ("main", "hangs", "building hangs-1.0 took longer than NIX_TIMEOUT (3 seconds) and was stopped"),
    ("main", "oldtool", "'oldtool' has been removed from the test package set; use 'hello' instead"),
    ("main", "arm64/native-tool", "no builder for aarch64-linux: native-tool-1.0 must be built on aarch64-linux"),
    ("deadline", "hangs", "the build took longer than NIXERY_BUILD_DEADLINE (3 seconds) and was stopped"),
    ("path", "hello", "cannot load the package set, local package set /nonexistent/pkgs (NIXERY_PKGS_PATH): "
                      "getting status of '/nonexistent/pkgs': No such file or directory"),
    ("git", "hello", "(NIXERY_PKGS_REPO): unable to access"),
    ("channel", "hello", "(NIXERY_CHANNEL, NIXERY_CHANNEL_URL): unable to download"),
]


@pytest.mark.parametrize(("kind", "image", "expected"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_every_client_prints_why(
    kind: str, image: str, expected: str, daemons: Callable[[str], Daemon], docker: list[str],
    containerd_service: Service, short_tmp: Path,
) -> None:
    """docker, podman, skopeo and ctr each print the failure's reason."""
    daemon = daemons(kind)
    for client in CLIENTS:
        output = pull(client, daemon.registry, image, docker, containerd_service, short_tmp)
        assert expected in output, f"{client} printed:\n{output}"


def test_a_stalled_channel_is_answered_within_30_seconds(daemons: Callable[[str], Daemon]) -> None:
    """A first pull whose channel download stalls answers in under 30 s with a 503 that
    says what could not be fetched and which settings choose it."""
    daemon = daemons("channel")
    started = time.monotonic()
    status, headers, body = daemon.request("/v2/shell/manifests/latest")
    took = time.monotonic() - started
    assert status == 503, body
    assert took < 30, took
    assert int(headers["Retry-After"]) > 0
    assert b"NIXERY_CHANNEL_URL" in body and b"/archive/nixos-unstable.tar.gz" in body


def test_a_platform_without_a_builder_leaves_the_others_served(
    daemons: Callable[[str], Daemon], docker: list[str]
) -> None:
    """With NIXERY_PLATFORMS naming a platform no builder serves, amd64 clients still get
    their image (the index lists what could be built), and the platform's own name says why."""
    daemon = daemons("platforms")
    ref = f"{daemon.registry}/native-tool:latest"
    code, output = attempt(*docker, "pull", ref)
    assert code == 0, output
    code, output = attempt("skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}")
    assert code == 0, output
    index = json.loads(output)
    assert [m["platform"]["architecture"] for m in index["manifests"]] == ["amd64"]
    code, output = attempt("skopeo", "inspect", "--tls-verify=false", "--override-arch", "arm64", f"docker://{ref}")
    assert code != 0
    code, output = attempt("skopeo", "inspect", "--tls-verify=false", f"docker://{daemon.registry}/arm64/native-tool")
    assert code != 0 and "no builder for aarch64-linux" in output, output
