"""Faults: a daemon killed mid-write, a package set that does not evaluate, a full
disk, a client that goes away. The daemon keeps serving and loses nothing."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests.daemon import Daemon, daemon_environment
from tests.processes import SLEEPER, exited_within
from tests.test_cache_end_to_end import NixCounter


def assert_store_sound(storage: Path) -> None:
    """Every blob under layers/ holds exactly the bytes its name says; no staging leftovers."""
    for blob in (storage / "layers").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
    for record in (storage / "builds").iterdir():
        digest = json.loads(record.read_text())["digest"].split(":")[1]
        assert (storage / "layers" / digest).exists(), record


def test_kill_9_while_packing_loses_nothing(tmp_path: Path) -> None:
    """A daemon killed with SIGKILL while writing layers leaves no partial blob under a served
    key, and the next one serves the image whole."""
    storage = tmp_path / "storage"
    daemon = Daemon(storage, daemon_environment(storage)).start()
    packed = threading.Event()
    assert daemon.process is not None
    pid = daemon.process.pid

    def kill_at_first_layer(line: str) -> None:
        if "packed layer" in line and not packed.is_set():
            packed.set()
            os.kill(pid, signal.SIGKILL)

    daemon.on_line.append(kill_at_first_layer)
    status, _, _ = daemon.request("/v2/shell/big/oddnames/hello/manifests/latest")
    assert status == 599, "the daemon answered before it was killed"
    daemon.stop()
    assert packed.is_set(), "the daemon never packed a layer"
    assert_store_sound(storage)

    again = Daemon(storage, daemon_environment(storage)).start()
    try:
        status, _, body = again.request("/v2/shell/big/oddnames/hello/manifests/latest")
        assert status == 200, body
        manifest = json.loads(body)
        for descriptor in [manifest["config"], *manifest["layers"]]:
            status, _, blob = again.request(f"/v2/shell/big/oddnames/hello/blobs/{descriptor['digest']}")
            assert status == 200
            assert "sha256:" + hashlib.sha256(blob).hexdigest() == descriptor["digest"]
    finally:
        again.stop()
    assert_store_sound(storage)
    assert os.listdir(storage / "staging") == []


def test_package_set_that_does_not_evaluate(tmp_path: Path) -> None:
    """A package set with a syntax error cannot be loaded: 503 UNKNOWN with Retry-After,
    carrying Nix's complaint and the setting that chose the set."""
    broken = tmp_path / "pkgs"
    broken.mkdir()
    (broken / "default.nix").write_text("{ ... }: { hello = ; }\n")
    storage = tmp_path / "storage"
    daemon = Daemon(storage, daemon_environment(storage, NIXERY_PKGS_PATH=str(broken))).start()
    try:
        status, headers, body = daemon.request("/v2/hello/manifests/latest")
        second, _, _ = daemon.request("/v2/")
    finally:
        daemon.stop()
    assert status == 503 and headers["Content-Type"] == "application/json"
    assert int(headers["Retry-After"]) > 0
    error = json.loads(body)["errors"][0]
    assert error["code"] == "UNKNOWN" and "syntax error" in error["message"]
    assert "(NIXERY_PKGS_PATH)" in error["message"]
    assert second == 200


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A file system of its own, too small for a whole image (tmpfs; the tests run as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_is_503_and_nothing_corrupt(small_disk: Path) -> None:
    """When the disk fills up mid-build the pull is a 503 with Retry-After, and what is stored is sound."""
    daemon = Daemon(small_disk, daemon_environment(small_disk)).start()
    try:
        status, headers, body = daemon.request("/v2/shell/hello/oddnames/manifests/latest")
        health, _, _ = daemon.request("/v2/")
    finally:
        daemon.stop()
    assert status == 503, body
    assert headers["Retry-After"] and json.loads(body)["errors"][0]["code"] == "UNKNOWN"
    assert health == 200
    assert_store_sound(small_disk)
    assert list((small_disk / "manifests").iterdir()) == []


def test_a_client_leaving_does_not_cancel_the_build(tmp_path: Path) -> None:
    """A client that disconnects mid-build does not stop the build another client waits for."""
    counter = NixCounter(tmp_path / "counter")
    storage = tmp_path / "storage"
    env = counter.env(daemon_environment(storage))
    daemon = Daemon(storage, env).start()
    try:
        leaving = socket.create_connection(("127.0.0.1", daemon.port))
        leaving.sendall(b"GET /v2/shell/gamma/big/manifests/latest HTTP/1.1\r\nHost: x\r\n\r\n")
        leaving.close()
        status, _, _ = daemon.request("/v2/shell/gamma/big/manifests/latest")
    finally:
        daemon.stop()
    assert status == 200
    assert counter.calls == 1


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_large_uploads_and_headers_are_refused_cheaply(tmp_path: Path) -> None:
    """A 64 MB upload is refused with 405 without being kept, and oversized headers get 431."""
    storage = tmp_path / "storage"
    daemon = Daemon(storage, daemon_environment(storage)).start()
    assert daemon.process is not None
    try:
        before = rss_kib(daemon.process.pid)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
            size = 64 * 1024 * 1024
            s.sendall(f"POST /v2/x/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
            chunk = b"\0" * (1024 * 1024)
            for _ in range(64):
                s.sendall(chunk)
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 405")
        assert rss_kib(daemon.process.pid) - before < 32 * 1024
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
            s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 431")
        status, _, _ = daemon.request("/v2/")
        assert status == 200
    finally:
        daemon.stop()


def test_kill_9_during_a_build_takes_nix_down_too(tmp_path: Path) -> None:
    """When the daemon dies by SIGKILL mid-build, Nix and its builder stop too, and the
    next daemon serves what was cached."""
    storage = tmp_path / "storage"
    daemon = Daemon(storage, daemon_environment(storage, NIX_TIMEOUT="600")).start()
    assert daemon.process is not None
    pid = daemon.process.pid
    started = threading.Event()
    builders: list[int] = []

    def kill_when_building(line: str) -> None:
        sleeper = SLEEPER.search(line)
        if sleeper and not started.is_set():
            builders.append(int(sleeper.group(1)))
            started.set()
            os.kill(pid, signal.SIGKILL)

    assert daemon.request("/v2/hello/manifests/latest")[0] == 200
    daemon.on_line.append(kill_when_building)
    status, _, _ = daemon.request("/v2/hangs/manifests/latest")
    daemon.stop()
    assert started.is_set() and status == 599
    assert exited_within(builders[0], 30), "the builder outlived the daemon"
    again = Daemon(storage, daemon_environment(storage)).start()
    try:
        assert again.request("/v2/hello/manifests/latest")[0] == 200
    finally:
        again.stop()
    assert_store_sound(storage)


def test_a_blob_damaged_on_disk_is_refused_then_rebuilt(tmp_path: Path) -> None:
    """A layer truncated on disk under a running daemon is not served (404), the next pull
    rebuilds it, and an image built afterwards by a fresh daemon does not reuse the damage."""
    storage = tmp_path / "storage"
    daemon = Daemon(storage, daemon_environment(storage)).start()
    status, _, body = daemon.request("/v2/alpha/manifests/latest")
    assert status == 200, body
    layers = json.loads(body)["layers"]
    for layer in layers:
        path = storage / "layers" / layer["digest"].split(":")[1]
        with open(path, "r+b") as f:
            f.truncate(layer["size"] // 2)
    status, _, body = daemon.request(f"/v2/alpha/blobs/{layers[0]['digest']}")
    assert (status, daemon.error_codes(body)) == (404, ["BLOB_UNKNOWN"])
    status, _, again = daemon.request("/v2/alpha/manifests/latest")
    assert status == 200 and json.loads(again)["layers"] == layers
    for layer in layers:
        status, _, data = daemon.request(f"/v2/alpha/blobs/{layer['digest']}")
        assert status == 200 and "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]
    daemon.stop()
    # Damage a base layer (every image has it); a fresh daemon building another image
    # finds it damaged and packs it again.
    shared = layers[0]
    (storage / "layers" / shared["digest"].split(":")[1]).write_bytes(b"garbage")
    fresh = Daemon(storage, daemon_environment(storage)).start()
    status, _, body = fresh.request("/v2/alpha/beta/manifests/latest")
    assert status == 200, body
    assert fresh.logged("damaged")
    assert_store_sound(storage)


def test_a_fresh_instance_refuses_a_blob_flipped_in_place(tmp_path: Path) -> None:
    """A layer with one byte changed and its size kept is refused (404) by an instance that
    never served a manifest naming it, and the next pull builds it anew, intact."""
    storage = tmp_path / "storage"
    daemon = Daemon(storage, daemon_environment(storage)).start()
    try:
        status, _, body = daemon.request("/v2/beta/manifests/latest")
        assert status == 200, body
    finally:
        daemon.stop()
    layers = json.loads(body)["layers"]
    damaged = layers[-1]["digest"]
    path = storage / "layers" / damaged.split(":")[1]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    with open(path, "r+b") as f:
        f.write(bytes(data))
    fresh = Daemon(storage, daemon_environment(storage)).start()
    try:
        status, _, _ = fresh.request(f"/v2/beta/blobs/{damaged}")
        assert status == 404
        status, _, again = fresh.request("/v2/beta/manifests/latest")
        assert status == 200 and json.loads(again)["layers"] == layers
        status, _, blob = fresh.request(f"/v2/beta/blobs/{damaged}")
        assert status == 200 and "sha256:" + hashlib.sha256(blob).hexdigest() == damaged
    finally:
        fresh.stop()
