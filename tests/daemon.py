"""A real nixeryd daemon on loopback, for end-to-end tests."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from tests.processes import die_with_parent, register, unregister

ROOT = Path(__file__).resolve().parent.parent
PKGS = ROOT / "tests" / "pkgs"
TWISTD = Path(sys.executable).parent / "twistd"
OFFLINE_NIX = "substituters =\nsandbox = false\nexperimental-features = nix-command\n"


def git_package_set(where: Path) -> tuple[str, str]:
    """A git repository of the test package set at ``where``: its file:// URL and the
    revision of its main branch. A branch ``release`` says "Hello from release" instead."""
    shutil.copytree(PKGS, where)
    git = ["git", "-C", str(where), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "first"], check=True)
    rev = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run([*git, "checkout", "-q", "-b", "release"], check=True)
    text = (where / "default.nix").read_text().replace("echo Hello from nixeryd", "echo Hello from release")
    (where / "default.nix").write_text(text)
    subprocess.run([*git, "commit", "-qam", "release"], check=True)
    subprocess.run([*git, "checkout", "-q", "main"], check=True)
    return "file://" + str(where), rev


def daemon_fixture(**extra: str) -> Any:
    """A module-scoped pytest fixture: a daemon on the test package set (``extra``: more
    settings), started once for the module's tests."""
    import pytest

    @pytest.fixture(scope="module")
    def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
        storage = tmp_path_factory.mktemp("storage")
        started = Daemon(storage, daemon_environment(storage, **extra)).start()
        yield started
        started.stop()

    return daemon


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drain(process: subprocess.Popen[bytes], output: list[str], ready: threading.Event, marker: str,
          hooks: list[Callable[[str], None]] | None = None) -> threading.Thread:
    """Read a child's output as it comes (so it never blocks on a full pipe) into ``output``;
    ``ready`` is set at the first line holding ``marker``, or when the output ends (the
    child is gone: the caller finds no marker in ``output`` and need not wait any longer)."""

    def read() -> None:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace")
            output.append(line)
            for hook in list(hooks or ()):
                hook(line)
            if marker in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def came_up(ready: threading.Event, output: list[str], marker: str, timeout: float) -> bool:
    """Wait for what ``drain`` reports: True once ``marker`` was printed, False when the
    child ended first or ``timeout`` passed."""
    return ready.wait(timeout) and any(marker in line for line in output)


@dataclass(kw_only=True)
class ServerProcess:
    """A helper server a test runs (an emulator, moto, containerd, dockerd): spawned, waited
    for until it prints ``marker``, and stopped with SIGTERM however the test ends (see
    tests/processes.py)."""

    marker: str
    environ: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    output: list[str] = field(default_factory=list)

    def spawn(self, command: list[str], timeout: float = 60.0) -> None:
        self.ready.clear()
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(), env=dict(os.environ, **self.environ),
        )
        register(self)
        drain(self.process, self.output, self.ready, self.marker)
        if not came_up(self.ready, self.output, self.marker, timeout):
            self.stop()
            raise AssertionError(f"{command[0]} did not start:\n" + "".join(self.output))

    def stop(self) -> None:
        unregister(self)
        if self.process is not None:
            terminate(self.process)
        self.process = None


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there after 20 seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    _started: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None
    twistd_args: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=list)  # more endpoints, beside the loopback port
    on_line: list[Callable[[str], None]] = field(default_factory=list)
    earlier: str = ""

    def start(self, timeout: float = 30.0) -> Daemon:
        # Started again after a stop: the earlier run's output is kept apart, so that its
        # start-up line does not count for this one.
        self.earlier += "".join(self.output)
        self.output = []
        self._started = threading.Event()
        self.port = free_port()
        self.process = subprocess.Popen(
            [str(TWISTD), "--nodaemon", "--pidfile=", *self.twistd_args, "nixeryd",
             "--listen", f"tcp:{self.port}:interface=127.0.0.1",
             *[arg for endpoint in self.listen for arg in ("--listen", endpoint)]],
            env=dict(self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),
        )
        register(self)
        self._reader = drain(self.process, self.output, self._started, "starting on", self.on_line)
        if came_up(self._started, self.output, "starting on", timeout):
            return self
        self.stop()
        raise AssertionError("nixeryd did not start:\n" + self.log)

    @property
    def log(self) -> str:
        return self.earlier + "".join(self.output)

    def logged(self, text: str, timeout: float = 10.0) -> bool:
        """Whether the daemon prints a line holding ``text`` within ``timeout`` seconds.
        The reader thread collects output as it comes, so a line written just before a
        response was sent may land a moment after the client has it."""
        seen = threading.Event()

        def look(line: str) -> None:
            if text in line:
                seen.set()

        self.on_line.append(look)
        try:
            return text in self.log or seen.wait(timeout)
        finally:
            self.on_line.remove(look)

    def stop(self) -> None:
        unregister(self)
        if self.process is None:
            return
        terminate(self.process)
        if self._reader is not None:
            self._reader.join(timeout=10)
        if self.process.stdout is not None:
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
        """One HTTP request; any status comes back, none raises (599: no answer at all)."""
        req = urllib.request.Request(self.url + path, method=method, headers=dict(headers or {}))
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
            return 599, {}, str(e).encode()

    def error_codes(self, body: bytes) -> list[str]:
        return [e["code"] for e in json.loads(body)["errors"]]


class NixCounter:
    """A ``nix-instantiate`` first on the daemon's PATH that notes each start, then runs the
    real one: every build begins with one evaluation of build.nix's ``info``."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.log = root / "nix-instantiate.calls"
        self.log.touch()
        real = shutil.which("nix-instantiate")
        assert real is not None
        shim = self.bin / "nix-instantiate"
        shim.write_text(f'#!/bin/sh\necho "$*" >> "{self.log}"\nexec "{real}" "$@"\n')
        shim.chmod(0o755)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return dict(base, PATH=f"{self.bin}:{base.get('PATH', '/usr/bin:/bin')}")

    @property
    def calls(self) -> int:
        """Builds started: evaluations of build.nix's ``info``."""
        return len(self.asked)

    @property
    def asked(self) -> list[list[str]]:
        """The names each build asked Nix to evaluate."""
        calls = [line for line in self.log.read_text().splitlines() if "-A info " in line]
        return [json.loads(line.split("--argstr packages ", 1)[1].split(" --argstr system ", 1)[0])
                for line in calls]


def manifest_digest(daemon: Daemon, name: str) -> str:
    status, headers, body = daemon.request(f"/v2/{name}/manifests/latest")
    assert status == 200, body
    return headers["Docker-Content-Digest"]
