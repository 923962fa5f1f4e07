"""The image page: what an image holds, as HTML with an SVG bar of its layers, or JSON."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from nixeryd.http.look import layer_colour
from tests.daemon import Daemon, daemon_fixture

daemon = daemon_fixture()


def test_the_page_as_json(daemon: Daemon) -> None:
    """Packages with versions, the closure size, each layer with its size and store paths,
    the layers other images share, the pull commands and the digests."""
    assert daemon.request("/v2/beta/manifests/latest")[0] == 200
    status, headers, body = daemon.request("/image/alpha", headers={"Accept": "application/json"})
    assert status == 200, body
    data = json.loads(body)
    assert data["name"] == "alpha" and data["digest"].startswith("sha256:") and data["sbom"].startswith("sha256:")
    packages = {p["name"]: p for p in data["packages"]}
    assert packages["alpha"]["version"] == "1.0" and packages["libshared"]["version"] == "1.0"
    assert data["closure_size"] == sum(p["nar_size"] for p in data["packages"]) > 0
    held = [path for layer in data["layers"] for path in (layer["store_paths"] or [])]
    assert any(path.endswith("-alpha-1.0") for path in held)
    assert data["layers"][-1]["store_paths"] == []  # the symlink layer
    assert any("beta" in layer["shared_with"] for layer in data["layers"])  # base packages' layer
    assert f"docker pull {daemon.registry}/alpha" in data["pull"]
    assert data["signature_tag"] is None  # signing is off: no tag that would answer 404
    assert data["built"] > 0


def test_the_page_as_html(daemon: Daemon) -> None:
    """One SVG bar per layer, a row per layer and per package, names escaped."""
    status, headers, body = daemon.request("/image/alpha")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    page = body.decode()
    layers = json.loads(daemon.request("/image/alpha", headers={"Accept": "application/json"})[2])["layers"]
    assert len(re.findall(r'<rect class="layer"', page)) == len(layers)
    assert "<script" not in page
    assert "libshared" in page and f"podman pull --tls-verify=false {daemon.registry}/alpha" in page


def test_unknown_and_bad_names(daemon: Daemon) -> None:
    """An unknown package is the registry's 404; a bad name its 400."""
    status, _, body = daemon.request("/image/nosuchthing")
    assert (status, daemon.error_codes(body)) == (404, ["MANIFEST_UNKNOWN"])
    status, _, body = daemon.request("/image/Bad")
    assert (status, daemon.error_codes(body)) == (400, ["NAME_INVALID"])


def test_chromium_renders_the_layer_bar(daemon: Daemon, tmp_path: Path) -> None:
    """Headless Chromium (Debian's) draws the page: the screenshot shows the SVG bar, in the
    colours of the image's layers, across the page."""
    from PIL import Image

    shot = tmp_path / "page.png"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,900",
         f"{daemon.url}/image/alpha"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    layers = json.loads(daemon.request("/image/alpha", headers={"Accept": "application/json"})[2])["layers"]
    picture = Image.open(shot).convert("RGB")
    colours = {picture.getpixel((x, y)) for x in range(0, picture.width, 2) for y in range(0, picture.height, 2)}
    drawn = [colour for colour in (layer_colour(i) for i in range(len(layers))) if _rgb(colour) in colours]
    assert len(drawn) == len(layers), (drawn, len(layers))  # every layer, the smallest too


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)
