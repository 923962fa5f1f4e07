"""Builds on Nix's remote builders: a cold pull whose derivation is built on a remote
builder (its own store over SSH, ``builders = ssh-ng://…``), not here; and with the
builder down, the failure every client prints, a 503 to try again later."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.daemon import OFFLINE_NIX, PKGS, Daemon, daemon_environment
from tests.remote_builder import RemoteBuilder


@pytest.fixture
def builder(tmp_path: Path) -> Iterator[RemoteBuilder]:
    started = RemoteBuilder(tmp_path / "builder").start()
    yield started
    started.stop()


def fresh_package_set(where: Path) -> Path:
    """The test set with a native-tool no store has built yet."""
    shutil.copytree(PKGS, where)
    (where / "native-nonce").write_text(secrets.token_hex(8))
    return where


def daemon_on(builder: RemoteBuilder, tmp_path: Path, pkgs: Path) -> Daemon:
    storage = tmp_path / "storage"
    return Daemon(storage, daemon_environment(
        storage, NIXERY_PKGS_PATH=str(pkgs), NIX_CONFIG=OFFLINE_NIX + builder.nix_config,
        NIX_SSHOPTS=builder.ssh_options)).start()


def test_a_cold_pull_is_built_on_the_remote_builder(builder: RemoteBuilder, tmp_path: Path) -> None:
    pkgs = fresh_package_set(tmp_path / "pkgs")
    daemon = daemon_on(builder, tmp_path, pkgs)
    try:
        status, _, body = daemon.request("/v2/native-tool/manifests/latest")
        assert status == 200, body
    finally:
        daemon.stop()
    # Built there (this host builds nothing: max-jobs = 0), then copied here to be packed.
    (built,) = builder.built("native-tool-1.0")
    assert os.path.isdir(f"/nix/store/{built}")
    assert any("native-tool-1.0" in line and "ssh-ng://root@127.0.0.1" in line for line in daemon.output)


def test_with_the_builder_down_clients_are_told_to_try_again(builder: RemoteBuilder, tmp_path: Path) -> None:
    pkgs = fresh_package_set(tmp_path / "pkgs")
    builder.stop()
    daemon = daemon_on(builder, tmp_path, pkgs)
    try:
        status, headers, body = daemon.request("/v2/native-tool/manifests/latest")
        assert status == 503, body
        assert "Retry-After" in headers
        assert b"no build machine could take the build (ssh-ng://root@127.0.0.1" in body
        shown = subprocess.run(["skopeo", "inspect", "--tls-verify=false",
                                f"docker://127.0.0.1:{daemon.port}/native-tool:latest"],
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode != 0
        assert "503 no build machine could take the build" in shown.stderr, shown.stderr
    finally:
        daemon.stop()
    assert builder.built("native-tool-1.0") == []
