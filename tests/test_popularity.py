"""Popularity data is loaded once, at start-up, from a file or a URL, within a timeout."""
from __future__ import annotations

import http.server
import json
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from nixeryd.build.popularity import load_popularity
from tests.daemon import TWISTD, daemon_environment

TABLE = {"glibc-2.37": 5000, "openssl-3.0": 1200}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/popularity.json":
            body = json.dumps(TABLE).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web() -> Iterator[str]:
    """A real HTTP server on loopback serving /popularity.json."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent() -> Iterator[str]:
    """A server that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/popularity.json"
    finally:
        listener.close()


def test_from_a_file(tmp_path: Path) -> None:
    """A file of name -> count is read as it is."""
    path = tmp_path / "pop.json"
    path.write_text(json.dumps(TABLE))
    assert load_popularity(str(path)) == TABLE


def test_from_a_url(web: str) -> None:
    """A URL is fetched once, with its data read the same way."""
    assert load_popularity(web + "/popularity.json") == TABLE


@pytest.mark.parametrize("path, reason", [("/missing.json", "HTTP 404")])
def test_a_url_that_fails(web: str, path: str, reason: str) -> None:
    """A URL answering an error is refused with a line saying so."""
    with pytest.raises(ValueError, match=reason):
        load_popularity(web + path)


def test_a_url_that_never_answers_times_out(silent: str) -> None:
    """A server that never answers costs the timeout, then a line, not a hang."""
    with pytest.raises(ValueError, match="cannot fetch .*timed out"):
        load_popularity(silent, timeout=0.5)


def test_unreadable_file_and_bad_data(tmp_path: Path) -> None:
    """A missing file and data that is not a table of counts are refused."""
    with pytest.raises(ValueError, match="cannot read"):
        load_popularity(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('["glibc"]')
    with pytest.raises(ValueError, match="JSON object"):
        load_popularity(str(bad))


def test_a_bad_popularity_url_stops_start_up_with_one_line(web: str, tmp_path: Path) -> None:
    """The daemon refuses to start on popularity data it cannot load, in one line."""
    env = daemon_environment(tmp_path / "s", NIX_POPULARITY_URL=web + "/missing.json")
    result = subprocess.run(
        [str(TWISTD), "--nodaemon", "--pidfile=", "nixeryd", "--listen", "tcp:0:interface=127.0.0.1"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "NIX_POPULARITY_URL" in lines[0] and "HTTP 404" in lines[0], result.stderr
