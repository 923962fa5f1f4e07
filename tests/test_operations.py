"""What an operator reads: the start-up line, /metrics, the version."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from nixeryd import __version__
from nixeryd.ops.metrics import ROUTES, route_of
from tests.daemon import PKGS, TWISTD, Daemon, daemon_environment


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus' text format, or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_start_up_line_metrics_and_version(tmp_path: Path) -> None:
    """Start-up says the package set, the storage and the listening addresses in one line;
    /metrics counts requests by route and status, and has the process, version and disk."""
    storage = tmp_path / "storage"
    daemon = Daemon(storage, daemon_environment(storage)).start()
    try:
        assert daemon.logged(f"package set: local package set {PKGS}; storage: directory {storage}; "
                             f"listening on: tcp:{daemon.port}:interface=127.0.0.1")
        assert daemon.request("/v2/hello/manifests/latest")[0] == 200
        assert daemon.request("/v2/no-such-package/manifests/latest")[0] == 404
        daemon.stop()
        daemon.start()  # storage is measured at start: now it holds an image
        assert daemon.request("/v2/hello/manifests/latest")[0] == 200
        status, _, body = daemon.request("/metrics")
    finally:
        daemon.stop()
    assert status == 200
    text = body.decode()
    assert metric(text, "nixeryd_http_requests_total", route="manifest", method="GET", status="200") == 1
    assert metric(text, "nixeryd_build_info", version=__version__) == 1
    for name in ("process_resident_memory_bytes", "process_open_fds", "process_cpu_seconds_total"):
        assert (metric(text, name) or 0) > 0, name
    assert (metric(text, "nixeryd_storage_bytes", kind="stored") or 0) > 10_000
    assert (metric(text, "nixeryd_storage_bytes", kind="free") or 0) > 0
    assert "hello" not in text


def test_route_labels_never_carry_a_name() -> None:
    """Every path, however hostile, is counted under one of a fixed set of routes."""
    paths = [b"/v2/", b"/v2/git/htop/manifests/latest", b"/v2/x/blobs/sha256:00", b"/v2/x/tags/list",
             b"/v2/_catalog", b"/v2/x/referrers/sha256:00", b"/", b"/image/git", b"/healthz", b"/metrics",
             b"/docs/index.html", b"/secret-name", b"/v2/evil-name"]
    routes = [route_of(p) for p in paths]
    assert set(routes) <= set(ROUTES)
    assert routes[:10] == ["base", "manifest", "blob", "tags", "catalog", "referrers", "index", "image_page",
                           "healthz", "metrics"]


def test_version() -> None:
    nixeryd = Path(sys.executable).parent / "nixeryd"
    for command in ([str(nixeryd), "--version"], [str(TWISTD), "nixeryd", "--version"]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"nixeryd {__version__}"
