"""A real nixeryd daemon on loopback, for end-to-end tests."""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parent.parent
PKGS = ROOT / "tests" / "pkgs"
TWISTD = Path(sys.executable).parent / "twistd"
OFFLINE_NIX = "substituters =\nsandbox = false\nexperimental-features = nix-command\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_environment(storage: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in list(env):
        if name.startswith(("NIXERY_", "NIX_")) or name in ("PORT", "STORAGE_PATH", "GCS_BUCKET"):
            del env[name]
    env.update(
        NIX_CONFIG=OFFLINE_NIX,
        NIXERY_PKGS_PATH=str(PKGS),
        NIXERY_STORAGE_BACKEND="filesystem",
        STORAGE_PATH=str(storage),
        NIX_TIMEOUT="30",
    )
    env.update(extra)
    return env


@dataclass
class Daemon:
    """``twistd -n nixeryd`` started for real, stopped with SIGTERM."""

    storage: Path
    env: Mapping[str, str]
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    output: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> "Daemon":
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(TWISTD), "--nodaemon", "--pidfile=", "nixeryd",
             "--listen", f"tcp:{self.port}:interface=127.0.0.1"],
            env=dict(self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.process.stdout], [], [], deadline - time.monotonic())
            if not ready:
                break
            line = self.process.stdout.readline().decode(errors="replace")
            if not line:
                break
            self.output.append(line)
            if "starting on" in line:
                os.set_blocking(self.process.stdout.fileno(), False)
                return self
        self.stop()
        raise AssertionError("nixeryd did not start:\n" + "".join(self.output))

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            try:
                rest = self.process.stdout.read()
            except (OSError, ValueError):
                rest = None
            if rest:
                self.output.append(rest.decode(errors="replace"))
            self.process.stdout.close()
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def registry(self) -> str:
        return f"127.0.0.1:{self.port}"

    def request(
        self, path: str, method: str = "GET", headers: Mapping[str, str] | None = None
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One HTTP request; any status comes back, none raises."""
        req = urllib.request.Request(self.url + path, method=method, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def error_codes(self, body: bytes) -> list[str]:
        return [e["code"] for e in json.loads(body)["errors"]]
