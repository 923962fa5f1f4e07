"""The pages people read, served by a real daemon and looked at in headless Chromium: the
index (commands that work as printed, the images built, failures once per image with
the reason first, the package set's trouble with its fix), image pages (errors as pages,
no signature tag without signing, a colour for every layer, when and from what an image
was built, packages asked for told from their dependencies), and what a visitor without
credentials sees of a private instance."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from nixeryd.http.look import layer_colour
from tests.daemon import PKGS, Daemon, daemon_environment
from tests.test_auth import HTPASSWD, basic

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    storage = tmp_path_factory.mktemp("storage")
    started = Daemon(storage, daemon_environment(storage, NIXERY_FAILURE_TTL="0")).start()
    yield started
    started.stop()


def page(daemon: Daemon, path: str, **headers: str) -> tuple[int, str]:
    status, _, body = daemon.request(path, headers={**BROWSER, **headers})
    return status, body.decode()


def chromium(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", *extra, url],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_index_commands_links_and_failures(daemon: Daemon) -> None:
    """Commands that work against plain HTTP, a link to each image built and to /metrics,
    each failing image once with its reason first and no markers of nixeryd's own, and no
    reloading while nothing builds."""
    assert daemon.request("/v2/hello/manifests/latest")[0] == 200
    for _ in range(2):  # failures are not remembered here: two failed builds
        assert daemon.request("/v2/broken/manifests/latest")[0] == 422
    status, html = page(daemon, "/")
    assert status == 200
    assert f"podman pull --tls-verify=false {daemon.registry}/shell/git/htop" in html
    assert f"skopeo copy --src-tls-verify=false docker://{daemon.registry}/shell/git/htop" in html
    assert "insecure-registries" in html
    assert '<a href="/image/hello">hello</a>' in html and '<a href="/metrics">' in html
    assert html.count("<code>broken:latest (amd64)</code>") == 1
    assert '<div class="reason">cannot build broken-1.0: broken-1.0: this package is meant to fail to build' in html
    assert "trace: nixeryd" not in html
    assert 'http-equiv="refresh"' not in html
    assert f"local package set {PKGS}" in html


def test_pages_answer_errors_as_pages(daemon: Daemon) -> None:
    """A browser asking for an image that cannot be had gets a page saying why, with the
    way back; a registry client still gets the spec's JSON."""
    status, html = page(daemon, "/image/nosuchthing")
    assert status == 404 and html.startswith("<!DOCTYPE html>")
    assert "packages not found: nosuchthing" in html and 'href="/"' in html
    status, _, body = daemon.request("/image/nosuchthing")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_image_page_says_when_and_from_what(daemon: Daemon) -> None:
    """When it was built, from what, asked-for packages apart from dependencies, a colour
    for each layer, no signature tag when signing is off, and the way back."""
    status, html = page(daemon, "/image/alpha")
    assert status == 200
    assert re.search(r"Built \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", html), html
    assert "<td>alpha</td><td>1.0</td>" in html and "asked for" in html
    assert re.search(r"<td>libshared</td><td>1.0</td><td>[^<]*</td><td>dependency</td>", html)
    fills = re.findall(r'<rect class="layer"[^>]*fill="(#[0-9a-f]{6})"', html)
    assert len(fills) == len(set(fills)) > 1
    assert fills == [layer_colour(i) for i in range(len(fills))]
    assert "signature tag" not in html and ".sig" not in html
    assert '<a class="home" href="/">' in html


def test_chromium_sees_the_index_and_an_image(daemon: Daemon, tmp_path: Path) -> None:
    """What a person sees in a browser: the index's title, its commands and the list of
    images; an image page's name, its layer bar and table, in a screenshot not blank."""
    from PIL import Image

    assert daemon.request("/v2/alpha/manifests/latest")[0] == 200
    dom = chromium(f"{daemon.url}/", tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"<title>nixeryd on {daemon.registry}</title>" in dom.stdout
    assert "podman pull --tls-verify=false" in dom.stdout and 'href="/image/alpha"' in dom.stdout
    dom = chromium(f"{daemon.url}/image/alpha", tmp_path, "--dump-dom")
    assert "<h1>alpha</h1>" in dom.stdout and 'id="layers"' in dom.stdout and "<th>store paths</th>" in dom.stdout
    shot = tmp_path / "index.png"
    result = chromium(f"{daemon.url}/", tmp_path, f"--screenshot={shot}", "--window-size=1100,800")
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    assert len(Image.open(shot).convert("RGB").getcolors(maxcolors=1_000_000) or []) > 10


def test_a_package_set_that_cannot_be_fetched_is_on_the_index(tmp_path: Path) -> None:
    """After a pull fails on the package set, the index says so first, with the fix."""
    storage = tmp_path / "storage"
    daemon = Daemon(storage, daemon_environment(storage, NIXERY_PKGS_PATH="/nonexistent/pkgs")).start()
    try:
        assert daemon.request("/v2/hello/manifests/latest")[0] == 503
        status, html = page(daemon, "/")
    finally:
        daemon.stop()
    assert status == 200
    problem = html.index('<div class="fix">')
    assert problem < html.index("<pre>")  # before anything else of substance
    assert "cannot load the package set, local package set /nonexistent/pkgs (NIXERY_PKGS_PATH)" in html
    assert "Choose a package set this host can fetch" in html


def test_a_private_instance_shows_nothing_without_credentials(tmp_path: Path) -> None:
    """With access control on, / shows how to pull and nothing about images, package sets or
    build logs; /image/ asks for credentials; /healthz stays open; /metrics names no image."""
    users = tmp_path / "htpasswd"
    users.write_text(HTPASSWD)
    storage = tmp_path / "storage"
    daemon = Daemon(storage, daemon_environment(storage, NIXERY_HTPASSWD=str(users))).start()
    auth = basic("ci", "s3cret")
    try:
        assert daemon.request("/v2/hello/manifests/latest", headers={"Authorization": auth})[0] == 200
        assert daemon.request("/v2/broken/manifests/latest", headers={"Authorization": auth})[0] == 422
        status, anonymous = page(daemon, "/")
        status_with, known = page(daemon, "/", Authorization=auth)
        image_status, _ = page(daemon, "/image/hello")
        health = daemon.request("/healthz")[0]
        metrics = daemon.request("/metrics")[2].decode()
    finally:
        daemon.stop()
    assert status == status_with == 200
    for secret in ("hello", "broken", str(PKGS), "meant to fail", "Recent build failures"):
        assert secret not in anonymous, secret
        assert secret in known, secret
    assert image_status == 401 and health == 200
    assert "hello" not in metrics and "broken" not in metrics
