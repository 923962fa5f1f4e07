"""Shared test set-up."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

# The clients' own daemons (dockerd, containerd) and a short directory for podman.
from tests.clients import containerd_service, docker, short_tmp  # noqa: F401
from tests.daemon import PKGS, NixCounter

# Every helper process a test starts is stopped, however the test ends.
from tests.processes import pytest_sessionfinish, stop_leftovers  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run every test inside its own temporary directory, so trial's mktemp()
    and anything else relative stays out of the checkout."""
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def nix_env() -> dict[str, str]:
    """Environment for real Nix in tests: offline, no binary caches."""
    env = dict(os.environ)
    env["NIX_CONFIG"] = ("substituters =\nsandbox = false\nexperimental-features = nix-command\n"
                         "build-users-group =\n")
    return env


@pytest.fixture
def counter(tmp_path: Path) -> NixCounter:
    return NixCounter(tmp_path / "counter")


@pytest.fixture
def private_pkgs(tmp_path: Path) -> Path:
    """A copy of the test package set, which a test may take away."""
    copy = tmp_path / "pkgs"
    shutil.copytree(PKGS, copy)
    return copy
