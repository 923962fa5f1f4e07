"""A package set on local disk is never stale: images are keyed by what it holds now."""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.daemon import PKGS, Daemon, NixCounter, daemon_environment, manifest_digest


def digest_at(daemon: Daemon, tag: str) -> str:
    status, headers, body = daemon.request(f"/v2/hello/manifests/{tag}")
    assert status == 200, body
    return headers["Docker-Content-Digest"]


def test_an_edit_is_built_fresh_and_an_unchanged_set_never(tmp_path: Path, counter: NixCounter) -> None:
    """An edited set gives a new image at the next pull, under every tag and after a
    restart; an unchanged one is served without Nix, after a restart too."""
    pkgs = tmp_path / "pkgs"
    shutil.copytree(PKGS, pkgs)
    storage = tmp_path / "storage"
    env = counter.env(daemon_environment(storage, NIXERY_PKGS_PATH=str(pkgs), NIXERY_PATH_RECHECK="0"))
    daemon = Daemon(storage, env).start()
    try:
        before = manifest_digest(daemon, "hello")
        assert digest_at(daemon, "another-tag") == before
        assert counter.calls == 1
        daemon.stop()
        daemon.start()
        assert manifest_digest(daemon, "hello") == before
        assert counter.calls == 1, "an unchanged set was built again after a restart"
        default = pkgs / "default.nix"
        default.write_text(default.read_text().replace("Hello from nixeryd", "Hello, edited"))
        after = manifest_digest(daemon, "hello")
        assert after != before
        assert counter.calls == 2
        assert digest_at(daemon, "yet-another-tag") == after
        daemon.stop()
        daemon.start()
        assert manifest_digest(daemon, "hello") == after
        assert counter.calls == 2
    finally:
        daemon.stop()
