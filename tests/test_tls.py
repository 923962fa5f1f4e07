"""HTTPS as README sets it up (``--listen ssl:…``), spoken by every client: curl (with
and without ALPN's HTTP/2 offer), Python's ssl with ALPN, skopeo, podman, containerd's
ctr, Docker's engine (the CA in certs.d) and headless Chromium."""
from __future__ import annotations

import shutil
import ssl
import subprocess
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from tests.clients import Service, attempt, run
from tests.daemon import Daemon, daemon_environment, free_port

DOCKER_CERTS = Path("/etc/docker/certs.d")


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int, Path]]:
    """A daemon listening on HTTPS too, with a certificate for 127.0.0.1 that is its own CA;
    yields the daemon, the HTTPS port and a directory holding ``ca.crt``."""
    where = tmp_path_factory.mktemp("tls")
    certs = where / "certs"
    certs.mkdir()
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout", str(where / "key.pem"), "-out", str(certs / "ca.crt"))
    port = free_port()
    storage = where / "storage"
    daemon = Daemon(storage, daemon_environment(storage), listen=[
        f"ssl:{port}:interface=127.0.0.1:privateKey={where / 'key.pem'}:certKey={certs / 'ca.crt'}"]).start()
    yield daemon, port, certs
    daemon.stop()


def test_curl_and_python_with_alpn(tls: tuple[Daemon, int, Path]) -> None:
    """Clients offering ALPN (h2 and http/1.1, or http/1.1 alone) get HTTP/1.1."""
    _, port, certs = tls
    ca = str(certs / "ca.crt")
    for extra in ([], ["--http1.1"]):
        out = run("curl", "-sS", "--cacert", ca, *extra, "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                  f"https://127.0.0.1:{port}/v2/")
        assert out == "200 1.1", out
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols(["h2", "http/1.1"])
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", context=context, timeout=60) as response:
        assert response.status == 200


def test_registry_clients_pull_over_https(tls: tuple[Daemon, int, Path], docker: list[str],
                                          containerd_service: Service, short_tmp: Path) -> None:
    """skopeo, podman, ctr and docker verify the certificate and pull."""
    _, port, certs = tls
    ref = f"127.0.0.1:{port}/hello:latest"
    run("skopeo", "inspect", "--cert-dir", str(certs), f"docker://{ref}")
    run("podman", "--root", str(short_tmp / "root"), "--runroot", str(short_tmp / "run"),
        "--storage-driver", "vfs", "pull", "--cert-dir", str(certs), ref)
    # containerd takes loopback registries for plain HTTP unless its hosts.toml says otherwise.
    hosts = short_tmp / "hosts" / f"127.0.0.1:{port}"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(f'server = "https://127.0.0.1:{port}"\n'
                                      f'[host."https://127.0.0.1:{port}"]\n  ca = "{certs / "ca.crt"}"\n')
    run("ctr", "--address", str(containerd_service.root / "containerd.sock"), "images", "pull",
        "--hosts-dir", str(short_tmp / "hosts"), "--snapshotter", "native", ref)
    mine = DOCKER_CERTS / f"127.0.0.1:{port}"
    mine.mkdir(parents=True)
    try:
        shutil.copy(certs / "ca.crt", mine / "ca.crt")
        code, output = attempt(*docker, "pull", ref)
        assert code == 0, output
    finally:
        shutil.rmtree(mine)


def test_chromium_shows_the_index_over_https(tls: tuple[Daemon, int, Path], tmp_path: Path) -> None:
    """A browser (it offers ALPN) opens the index page over HTTPS: its DOM is the page,
    and its screenshot is not blank."""
    from PIL import Image

    _, port, _ = tls
    url = f"https://127.0.0.1:{port}/"
    browser = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                         stdin=subprocess.DEVNULL)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>nixeryd" in dom.stdout, dom.stdout[:2000]
    shot = tmp_path / "index.png"
    result = subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1000,700", url],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1_000_000) or []
    assert len(colours) > 10, "blank page"
