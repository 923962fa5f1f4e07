"""Build each image once: concurrent pulls, restarts and instances sharing storage,
counted in real Nix evaluations started by real daemons."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.daemon import Daemon, NixCounter, daemon_environment, manifest_digest
from tests.emulator import shared_emulator
from tests.test_gcs_end_to_end import gcs_environment


def test_concurrent_pulls_of_a_cold_image_build_once(tmp_path: Path, counter: NixCounter,
                                                      private_pkgs: Path) -> None:
    """32 concurrent pulls of one image not built before start one Nix build and agree."""
    env = counter.env(daemon_environment(tmp_path / "storage", NIXERY_PKGS_PATH=str(private_pkgs)))
    daemon = Daemon(tmp_path / "storage", env).start()
    try:
        # Several of the 32 ask in other orders: the same image, the same build.
        names = ["shell/alpha/gamma", "shell/gamma/alpha", "shell/gamma/alpha/gamma"] * 11
        with ThreadPoolExecutor(32) as pool:
            digests = list(pool.map(lambda name: manifest_digest(daemon, name), names[:32]))
    finally:
        daemon.stop()
    assert len(set(digests)) == 1
    assert counter.calls == 1


def test_restart_serves_cached_images_without_nix(
    tmp_path: Path, counter: NixCounter, private_pkgs: Path
) -> None:
    """After a restart an image built before is served from storage, without running Nix
    (a path source unchanged: see test_path_source.py for one that changed)."""
    env = counter.env(daemon_environment(tmp_path / "storage", NIXERY_PKGS_PATH=str(private_pkgs)))
    first = Daemon(tmp_path / "storage", env).start()
    try:
        digest = manifest_digest(first, "shell/beta")
    finally:
        first.stop()
    second = Daemon(tmp_path / "storage", env).start()
    try:
        assert manifest_digest(second, "shell/beta") == digest
        status, _, body = second.request(f"/v2/shell/beta/manifests/{digest}")
        assert status == 200
        for layer in json.loads(body)["layers"]:
            status, _, _ = second.request(f"/v2/shell/beta/blobs/{layer['digest']}", "HEAD")
            assert status == 200
    finally:
        second.stop()
    assert counter.calls == 1


def test_two_instances_share_filesystem_storage(tmp_path: Path, counter: NixCounter,
                                                private_pkgs: Path) -> None:
    """A second instance on the same storage serves the first one's image without Nix."""
    env = counter.env(daemon_environment(tmp_path / "storage", NIXERY_PKGS_PATH=str(private_pkgs)))
    one = Daemon(tmp_path / "storage", env).start()
    two = Daemon(tmp_path / "storage", env).start()
    try:
        digest = manifest_digest(one, "hello/gamma")
        assert counter.calls == 1
        assert manifest_digest(two, "hello/gamma") == digest
        assert counter.calls == 1
    finally:
        one.stop()
        two.stop()


def test_tags_are_seen_by_every_instance_and_survive_restarts(tmp_path: Path) -> None:
    """A tag pulled from one instance is listed by another on the same storage, and by a
    new instance after both stopped; the catalogue too."""
    env = daemon_environment(tmp_path / "storage")
    one = Daemon(tmp_path / "storage", env).start()
    two = Daemon(tmp_path / "storage", env).start()
    assert one.request("/v2/hello/manifests/v1.2")[0] == 200
    status, _, body = two.request("/v2/hello/tags/list")
    assert status == 200 and json.loads(body)["tags"] == ["latest", "v1.2"]
    one.stop()
    two.stop()
    again = Daemon(tmp_path / "storage", env).start()
    assert json.loads(again.request("/v2/hello/tags/list")[2])["tags"] == ["latest", "v1.2"]
    assert json.loads(again.request("/v2/_catalog")[2])["repositories"] == ["hello"]


def test_two_instances_share_a_bucket(tmp_path: Path, counter: NixCounter, private_pkgs: Path) -> None:
    """A second instance on the same bucket serves the first one's image without Nix."""
    emulator = shared_emulator()
    bucket = emulator.new_bucket()
    envs = [
        counter.env(gcs_environment(tmp_path / f"local{i}", emulator, bucket,
                                    NIXERY_PKGS_PATH=str(private_pkgs)))
        for i in (1, 2)
    ]
    one = Daemon(tmp_path / "local1", envs[0]).start()
    two = Daemon(tmp_path / "local2", envs[1]).start()
    try:
        digest = manifest_digest(one, "shell/hello/gamma")
        assert manifest_digest(two, "shell/hello/gamma") == digest
        assert counter.calls == 1
    finally:
        one.stop()
        two.stop()
