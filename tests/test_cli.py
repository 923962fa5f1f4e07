"""The nixeryd command: build without HTTP, gc, popularity, help."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import PKGS, Daemon, NixCounter, daemon_environment

NIXERYD = str(Path(sys.executable).parent / "nixeryd")


def nixeryd(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NIXERYD, *args], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("command", ["build", "gc", "verify", "popularity", "serve"])
def test_every_command_has_help(command: str) -> None:
    """Each command explains itself with --help."""
    result = nixeryd(dict(os.environ), command, "--help")
    assert result.returncode == 0
    assert "usage" in (result.stdout + result.stderr).lower()


def test_build_warms_storage_for_the_daemon(tmp_path: Path, counter: NixCounter) -> None:
    """`nixeryd build` stores an image that a daemon on the same storage then serves without Nix."""
    pkgs = tmp_path / "pkgs"
    shutil.copytree(PKGS, pkgs)
    env = daemon_environment(tmp_path / "storage", NIXERY_PKGS_PATH=str(pkgs))
    result = nixeryd(env, "build", "shell/hello:latest")
    assert result.returncode == 0, result.stderr
    built = json.loads(result.stdout)
    assert built["image"] == "shell/hello:latest"
    assert "layer 1:" in result.stderr
    daemon = Daemon(tmp_path / "storage", counter.env(env)).start()
    try:
        status, headers, _ = daemon.request("/v2/shell/hello/manifests/latest")
    finally:
        daemon.stop()
    assert (status, headers["Docker-Content-Digest"]) == (200, built["digest"])
    assert counter.calls == 0  # served from what `build` stored


def test_build_errors_are_one_line(tmp_path: Path) -> None:
    """Unknown packages and bad names end the command with one clear line."""
    env = daemon_environment(tmp_path / "storage")
    for name, words in [("nosuchpkg", "packages not found: nosuchpkg"), ("Bad", "invalid path component")]:
        result = nixeryd(env, "build", name)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("nixeryd: ") and words in last, result.stderr
        assert "Traceback" not in result.stderr


def test_gc_after_build(tmp_path: Path) -> None:
    """gc keeps a fresh image whole, and a dry run with no window would remove it all."""
    env = daemon_environment(tmp_path / "storage")
    assert nixeryd(env, "build", "hello").returncode == 0
    layers = set(os.listdir(tmp_path / "storage" / "layers"))
    kept = json.loads(nixeryd(env, "gc", "--keep-days", "7").stdout)
    assert kept["removed_blobs"] == 0 and kept["kept_images"] == 1
    assert set(os.listdir(tmp_path / "storage" / "layers")) == layers
    old = 1_000_000_000
    for directory in ("layers", "manifests", "builds"):
        for entry in (tmp_path / "storage" / directory).iterdir():
            os.utime(entry, (old, old))
    record = next((tmp_path / "storage" / "manifests").iterdir())
    doc = json.loads(record.read_text())
    record.write_text(json.dumps(dict(doc, built=old, served=old)))
    os.utime(record, (old, old))
    dry = json.loads(nixeryd(env, "gc", "--keep-days", "7", "--dry-run").stdout)
    assert dry["removed_blobs"] == len(layers)
    assert set(os.listdir(tmp_path / "storage" / "layers")) == layers
    real = json.loads(nixeryd(env, "gc", "--keep-days", "7").stdout)
    assert real["removed_blobs"] == len(layers)
    assert os.listdir(tmp_path / "storage" / "layers") == []


def test_popularity_of_the_test_package_set(tmp_path: Path) -> None:
    """popularity counts, for each package, the derivations that take it as an input."""
    env = daemon_environment(tmp_path / "storage", NIXERY_PKGS_PATH=str(PKGS))
    out = tmp_path / "popularity.json"
    result = nixeryd(env, "popularity", "-o", str(out))
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())
    assert table["libshared-1.0"] == 2
    assert table["gamma-0.3"] == 1
    assert table["busybox-1.35"] >= 10


def test_build_with_zstd_layers_prints_its_digest(tmp_path: Path) -> None:
    """`nixeryd build` with zstd layers (which have no Docker manifest) ends with its JSON line."""
    env = daemon_environment(tmp_path / "storage", NIXERY_LAYER_COMPRESSION="zstd")
    result = nixeryd(env, "build", "hello")
    assert result.returncode == 0, result.stderr
    built = json.loads(result.stdout)
    assert built["digest"].startswith("sha256:") and built["docker_digest"] is None


def nixeryd_on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run nixeryd with its standard error on a pseudo-terminal: (exit code, stdout, terminal)."""
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen([NIXERYD, *args], env=env, stdout=subprocess.PIPE, stderr=follower,
                               stdin=subprocess.DEVNULL, text=True)
    os.close(follower)
    screen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the command has closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(leader)
    assert process.stdout is not None
    out = process.stdout.read()
    return process.wait(timeout=60), out, screen.decode(errors="replace")


def test_verify_finds_repairs_and_the_next_pull_rebuilds(tmp_path: Path) -> None:
    """`nixeryd verify` re-hashes every blob: a sound store passes; a layer replaced on disk
    is reported (exit 1) with the records naming it; --repair removes them, verify passes
    again, and the next pull rebuilds the image whole. On a terminal it draws a progress bar."""
    storage = tmp_path / "storage"
    env = daemon_environment(storage)
    assert nixeryd(env, "build", "alpha").returncode == 0
    result = nixeryd(env, "verify")
    assert result.returncode == 0, result.stderr
    sound = json.loads(result.stdout)
    assert sound["damaged"] == [] and sound["blobs"] > 3 and sound["records"] > 3
    layer_record = next((storage / "builds").iterdir())
    digest = json.loads(layer_record.read_text())["digest"].split(":")[1]
    (storage / "layers" / digest).write_bytes(b"not the layer")
    code, out, screen = nixeryd_on_a_terminal(env, "verify")
    assert code == 1
    report = json.loads(out)
    assert f"layers/{digest}" in report["damaged"]
    assert f"builds/{layer_record.name}" in report["damaged"]
    assert any(key.startswith("manifests/") for key in report["damaged"]) is False
    assert "blobs    [" in screen and "\r" in screen and f"damaged: layers/{digest}" in screen
    result = nixeryd(env, "verify", "--repair")
    assert result.returncode == 0, result.stderr
    assert sorted(json.loads(result.stdout)["removed"]) == sorted(report["damaged"])
    assert not (storage / "layers" / digest).exists() and not layer_record.exists()
    assert json.loads(nixeryd(env, "verify").stdout)["damaged"] == []
    daemon = Daemon(storage, env).start()
    status, _, body = daemon.request("/v2/alpha/manifests/latest")
    assert status == 200, body
    for layer in json.loads(body)["layers"]:
        status, _, data = daemon.request(f"/v2/alpha/blobs/{layer['digest']}")
        assert status == 200 and len(data) == layer["size"]
