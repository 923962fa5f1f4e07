"""Shared test set-up."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

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
    env["NIX_CONFIG"] = "substituters =\nsandbox = false\nexperimental-features = nix-command\n"
    return env
