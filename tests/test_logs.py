"""JSON log lines for journald."""
from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from nixeryd.ops.logs import JSONLines
from tests.daemon import Daemon, daemon_environment


def test_one_json_object_per_line_with_stable_keys() -> None:
    """Each event is one line of JSON with its message and stable keys, secrets of other keys left out."""
    out = io.StringIO()
    log = Logger(namespace="nixeryd.test", observer=JSONLines(out))
    log.info("built {image} in {seconds:.1f}s", image="shell/git", seconds=2.25, tag="latest",
             digest="sha256:ab", url="https://signed.example/?X-Goog-Signature=secret")
    try:
        raise ValueError("multi\nline")
    except ValueError:
        log.failure("packing failed", Failure(), layer="k")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "built shell/git in 2.2s"
    assert (first["image"], first["tag"], first["digest"]) == ("shell/git", "latest", "sha256:ab")
    assert first["level"] == LogLevel.info.name and first["namespace"] == "nixeryd.test"
    assert "secret" not in lines[0]
    assert second["level"] == "critical" and "ValueError" in second["traceback"]
    assert second["layer"] == "k"


def test_daemon_logs_json_with_build_log_lines(tmp_path: Path) -> None:
    """Under --logger every line the daemon prints is JSON, and Nix's output arrives as build_log lines."""
    env = daemon_environment(tmp_path / "s")
    daemon = Daemon(tmp_path / "s", env, twistd_args=["--logger", "nixeryd.ops.logs.json_lines"]).start()
    try:
        status, _, _ = daemon.request("/v2/broken/manifests/latest")
    finally:
        daemon.stop()
    assert status == 422
    records = [json.loads(line) for line in daemon.log.splitlines() if line.strip()]
    build_lines = [r for r in records if r.get("build_log")]
    assert any("meant to fail" in r["message"] for r in build_lines)
    assert all(r["image"] == "broken:latest (amd64)" for r in build_lines)


def test_request_lines_can_be_left_out_of_the_log(tmp_path: Path) -> None:
    """Each request is a log line by default; NIXERY_ACCESS_LOG=false leaves them out, and
    /metrics still counts the requests."""
    for setting, logged in (("true", True), ("false", False)):
        storage = tmp_path / setting
        daemon = Daemon(storage, daemon_environment(storage, NIXERY_ACCESS_LOG=setting)).start()
        try:
            assert daemon.request("/v2/")[0] == 200
            _, _, metrics = daemon.request("/metrics")
        finally:
            daemon.stop()
        assert ('"GET /v2/ HTTP/1.1" 200' in daemon.log) == logged, daemon.log[-2000:]
        assert b'nixeryd_http_requests_total{method="GET",route="base",status="200"} 1.0' in metrics
