"""The host's own Nix settings survive: nixeryd never writes /etc/nix/nix.conf, uses the
host's where there is one, and brings its own only where there is none."""
from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

from nixeryd.build.nix import DOWNLOAD_SETTINGS, nix_environment
from nixeryd.parts import nix_conf_dir
from tests.daemon import PKGS, ROOT, Daemon, daemon_environment

HOST_CONF = (
    "# the operator's own settings, kept byte for byte\n"
    "build-users-group =\nsandbox = false\n"
    "extra-platforms = aarch64-linux\n"
)


def test_the_host_file_is_used_where_there_is_one(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    assert nix_conf_dir({}, host_dir=str(host)) == str(ROOT / "etc" / "nix")
    assert nix_conf_dir({"NIX_CONF_DIR": str(host)}) == str(ROOT / "etc" / "nix")
    (host / "nix.conf").write_text(HOST_CONF)
    assert nix_conf_dir({}, host_dir=str(host)) is None
    assert nix_conf_dir({"NIX_CONF_DIR": str(host)}) is None


def test_download_settings_come_before_the_operators() -> None:
    """The operator's NIX_CONFIG comes last, so it can change nixeryd's timeouts."""
    env = nix_environment({"NIX_CONFIG": "stalled-download-timeout = 300\n"}, "/opt/etc/nix")
    assert env["NIX_CONFIG"] == DOWNLOAD_SETTINGS + "stalled-download-timeout = 300\n"
    assert env["NIX_CONF_DIR"] == "/opt/etc/nix"
    assert "NIX_CONF_DIR" not in nix_environment({}, None)


def test_make_install_never_writes_the_hosts_nix_conf() -> None:
    """`make install` (as a dry run: every command it would run) names no file under /etc/nix."""
    result = subprocess.run(["make", "-C", str(ROOT), "-n", "-B", "install"], capture_output=True, text=True,
                            timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    assert "/etc/nix" not in result.stdout, result.stdout


def test_builds_follow_the_host_file_and_leave_it_as_it_was(tmp_path: Path) -> None:
    """With a host nix.conf that lets this machine build for aarch64, an arm64 image of a
    package built for its platform builds; the file is unchanged. Without one, nixeryd's
    own settings build everything else and say no builder serves aarch64."""
    host = tmp_path / "host"
    host.mkdir()
    (host / "nix.conf").write_text(HOST_CONF)
    pkgs = tmp_path / "pkgs"
    shutil.copytree(PKGS, pkgs)
    (pkgs / "native-nonce").write_text(secrets.token_hex(8))
    storage = tmp_path / "storage"
    daemon = Daemon(storage, daemon_environment(storage, NIX_CONF_DIR=str(host), NIXERY_PKGS_PATH=str(pkgs))).start()
    try:
        status, _, body = daemon.request("/v2/arm64/native-tool/manifests/latest")
        assert status == 200, body
    finally:
        daemon.stop()
    assert (host / "nix.conf").read_text() == HOST_CONF
    empty = tmp_path / "empty"
    empty.mkdir()
    (pkgs / "native-nonce").write_text(secrets.token_hex(8))  # never built, for aarch64 or at all
    storage = tmp_path / "storage2"
    daemon = Daemon(storage, daemon_environment(storage, NIX_CONF_DIR=str(empty), NIXERY_PKGS_PATH=str(pkgs))).start()
    try:
        # A new derivation built here: as root without a nixbld group, only nixeryd's own
        # settings (build-users-group =) let Nix build at all.
        assert daemon.request("/v2/native-tool/manifests/latest")[0] == 200
        status, _, body = daemon.request("/v2/arm64/native-tool/manifests/latest")
        assert status == 422 and b"no builder for aarch64-linux" in body, body
    finally:
        daemon.stop()
    assert list(empty.iterdir()) == []
