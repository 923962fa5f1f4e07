"""The systemd units and the example environment file."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nixeryd.config import Config, ConfigError
from tests.daemon import ROOT, TWISTD


def test_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verifies nixeryd.service and nixeryd.socket without a word of complaint."""
    service = (ROOT / "nixeryd.service").read_text()
    assert "/opt/nixeryd/.venv/bin/twistd" in service
    (tmp_path / "nixeryd.service").write_text(service.replace("/opt/nixeryd/.venv/bin/twistd", str(TWISTD)))
    (tmp_path / "nixeryd.socket").write_text((ROOT / "nixeryd.socket").read_text())
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "nixeryd.service"),
         str(tmp_path / "nixeryd.socket")],
        capture_output=True, text=True,
    )
    assert (result.returncode, result.stderr.strip()) == (0, "")


def test_service_is_hardened() -> None:
    """The service runs unprivileged, through nix-daemon, with the system read-only."""
    settings = dict(
        line.split("=", 1) for line in (ROOT / "nixeryd.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["DynamicUser"] == "yes" and settings["NoNewPrivileges"] == "yes"
    assert settings["ProtectSystem"] == "strict" and settings["StateDirectory"] == "nixeryd"
    assert settings["EnvironmentFile"] == "/etc/nixeryd/nixeryd.env"
    assert "--nodaemon --pidfile=" in settings["ExecStart"]


def test_example_environment_is_valid() -> None:
    """Every setting of etc/nixeryd.env, commented or not, is accepted."""
    env = {}
    for line in (ROOT / "etc" / "nixeryd.env").read_text().splitlines():
        line = line.lstrip("#").strip()
        if "=" in line and " " not in line.split("=", 1)[0]:
            name, value = line.split("=", 1)
            env[name] = value
    assert {"PORT", "NIXERY_CHANNEL", "STORAGE_PATH", "GCS_BUCKET", "NIX_TIMEOUT"} <= set(env)
    # The example offers a channel, a repository, a flake or a path, and a signing key or a
    # keyless account: one of each at a time.
    keyless = env.pop("NIXERY_SIGNING_ACCOUNT")
    sources = {"NIXERY_CHANNEL", "NIXERY_PKGS_REPO", "NIXERY_PKGS_FLAKE", "NIXERY_PKGS_PATH"}
    for source in sources:
        Config.from_env({k: v for k, v in env.items() if k not in sources - {source}})
    with pytest.raises(ConfigError, match="NIXERY_CHANNEL, NIXERY_PKGS_REPO, NIXERY_PKGS_FLAKE, NIXERY_PKGS_PATH"):
        Config.from_env(env)
    one_source = {k: v for k, v in env.items() if k not in sources - {"NIXERY_CHANNEL"}}
    without_key = {k: v for k, v in one_source.items() if not k.startswith("GCS_SIGNING_")}
    Config.from_env({**without_key, "NIXERY_SIGNING_ACCOUNT": keyless})
    with pytest.raises(ConfigError, match="NIXERY_SIGNING_ACCOUNT, GCS_SIGNING_KEY"):
        Config.from_env({**one_source, "NIXERY_SIGNING_ACCOUNT": keyless})
