"""On an internal network: the package set comes from a mirror (NIXERY_CHANNEL_URL), a
cold pull substitutes from a binary cache served over loopback HTTP (made with ``nix
copy``, signed), and a cache that does not answer is left out of every build instead of
costing each one Nix's timeouts."""
from __future__ import annotations

import http.server
import secrets
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path
from typing import Iterator

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from nixeryd.build.substituters import BinaryCaches, answers, configured_substituters
from nixeryd.core.offload import inline
from tests.daemon import OFFLINE_NIX, PKGS, Daemon, daemon_environment
from tests.test_client_errors import StalledServer


class Probes:
    """Stands where the network is: which URLs answer, and each probe made."""

    def __init__(self, down: set[str]) -> None:
        self.down = down
        self.asked: list[str] = []

    def __call__(self, url: str, timeout: float) -> bool:
        self.asked.append(url)
        return url not in self.down


def setting(caches: BinaryCaches, configured: list[str]) -> str:
    async def load() -> list[str]:
        return configured

    result: list[str] = []
    Deferred.fromCoroutine(caches.setting(load)).addCallback(result.append)
    assert result, "the setting was not ready at once"
    return result[0]


def test_caches_that_do_not_answer_are_left_out_and_come_back() -> None:
    clock = Clock()
    probes = Probes({"http://down.internal"})
    caches = BinaryCaches(clock, inline, probes, interval=60)
    configured = ["https://cache.internal", "http://down.internal", "file:///srv/cache", "s3://bucket"]
    assert setting(caches, configured) == "substituters = https://cache.internal file:///srv/cache s3://bucket\n"
    assert probes.asked == ["https://cache.internal", "http://down.internal"]  # only HTTP ones
    clock.advance(30)
    setting(caches, configured)
    assert len(probes.asked) == 2  # within the interval: no new probe
    probes.down.clear()
    clock.advance(31)
    # The probe after the interval runs behind this build, which still goes without it.
    assert setting(caches, configured) == ""
    assert len(probes.asked) == 4


def test_every_cache_answering_changes_nothing() -> None:
    caches = BinaryCaches(Clock(), inline, Probes(set()))
    assert setting(caches, ["https://cache.nixos.org/"]) == ""


def test_substituters_nix_would_use_are_read_from_nix(tmp_path: Path) -> None:
    """``nix show-config`` with the operator's settings: extra-substituters included."""
    env = daemon_environment(tmp_path, NIX_CONFIG="substituters = http://a.internal\n"
                                                  "extra-substituters = file:///srv/b\n")
    shown = subprocess.run(["nix", "show-config", "--json", "--extra-experimental-features", "nix-command"],
                           env=env, capture_output=True, check=True)
    assert configured_substituters(shown.stdout) == ["http://a.internal", "file:///srv/b"]


def test_the_probe_tells_answering_from_silent(tmp_path: Path) -> None:
    """Any HTTP answer counts (a private cache may want credentials); a refused connection
    or one that never answers does not."""
    stalled = StalledServer()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert answers(f"http://127.0.0.1:{server.server_port}", 2)  # 501: an answer
        assert answers(f"http://127.0.0.1:{server.server_port}/?priority=10", 2)
        assert not answers(f"http://127.0.0.1:{stalled.port}", 0.5)
        assert not answers("http://127.0.0.1:1", 0.5)
    finally:
        server.shutdown()
        stalled.close()


class CacheServer:
    """A binary cache directory served over loopback HTTP, logging each path asked for."""

    def __init__(self, root: Path) -> None:
        requested = self.requested = []  # type: list[str]

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

            def log_message(self, format: str, *args: object) -> None:
                requested.append(self.path)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[tuple[CacheServer, str, str]]:
    """htop's closure in a signed binary cache, and htop gone from this host's store: the
    cache server, its public key, htop's store path."""
    env = daemon_environment(tmp_path)
    secret, public = tmp_path / "cache.secret", tmp_path / "cache.public"
    subprocess.run(["nix-store", "--generate-binary-cache-key", "cache.internal-1", str(secret), str(public)],
                   env=env, check=True)
    source = f'{{"type":"path","path":"{PKGS}"}}'
    htop = subprocess.run(
        ["nix-build", "--no-out-link", str(Path(__file__).parent.parent / "nix" / "build.nix"), "-A", "packages",
         "--argstr", "source", source, "--argstr", "packages", '["htop"]', "--argstr", "system", "x86_64-linux"],
        env=env, check=True, capture_output=True, text=True).stdout.strip()
    closure = subprocess.run(["nix-store", "-qR", htop], env=env, check=True, capture_output=True,
                             text=True).stdout.split()
    subprocess.run(["nix", "copy", "--to", f"file://{tmp_path / 'cache'}?secret-key={secret}", *closure],
                   env=env, check=True, capture_output=True)
    subprocess.run(["nix-store", "--delete", htop], env=env, check=True, capture_output=True)
    assert not Path(htop).exists()
    server = CacheServer(tmp_path / "cache")
    yield server, public.read_text().strip(), htop
    server.close()


def test_a_cold_pull_substitutes_from_an_internal_cache(tmp_path: Path, cache: tuple[CacheServer, str, str]) -> None:
    server, public_key, htop = cache
    storage = tmp_path / "storage"
    nix_config = OFFLINE_NIX + f"substituters = {server.url}\ntrusted-public-keys = {public_key}\n"
    daemon = Daemon(storage, daemon_environment(storage, NIX_CONFIG=nix_config)).start()
    try:
        status, _, body = daemon.request("/v2/htop/manifests/latest")
        assert status == 200, body
    finally:
        daemon.stop()
    assert Path(htop).exists()
    name = Path(htop).name.split("-", 1)[0]
    assert f"/{name}.narinfo" in server.requested
    assert any(path.startswith("/nar/") for path in server.requested)


def test_a_cache_that_does_not_answer_costs_builds_nothing(tmp_path: Path) -> None:
    """A cache that takes connections and never answers (Nix would wait its stall timeout
    twice in every build): nixeryd's probe is the only connection it gets; the build of
    a derivation no store has goes on without it."""
    stalled = StalledServer()
    pkgs = tmp_path / "pkgs"
    shutil.copytree(PKGS, pkgs)
    (pkgs / "native-nonce").write_text(secrets.token_hex(8))
    storage = tmp_path / "storage"
    env = daemon_environment(storage, NIXERY_PKGS_PATH=str(pkgs),
                             NIX_CONFIG=OFFLINE_NIX + f"substituters = http://127.0.0.1:{stalled.port}\n")
    daemon = Daemon(storage, env).start()
    try:
        status, _, body = daemon.request("/v2/native-tool/manifests/latest")
        assert status == 200, body
        assert len(stalled.held) == 1
        assert any(f"binary cache http://127.0.0.1:{stalled.port} does not answer" in line
                   for line in daemon.output)
    finally:
        daemon.stop()
        stalled.close()


def test_the_channel_comes_from_an_internal_mirror(tmp_path: Path) -> None:
    """A channel's tarball (laid out as GitHub's archives are: one top directory) served
    over loopback HTTP as NIXERY_CHANNEL_URL; images are built from it."""
    channel = "internal-" + secrets.token_hex(4)  # Nix keeps tarballs by URL for an hour
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / f"{channel}.tar.gz", "w:gz") as tar:
        tar.add(PKGS, arcname=f"nixpkgs-{channel}")
    server = CacheServer(mirror)
    storage = tmp_path / "storage"
    env = daemon_environment(storage, NIXERY_CHANNEL=channel, NIXERY_CHANNEL_URL=server.url + "/{channel}.tar.gz")
    del env["NIXERY_PKGS_PATH"]
    daemon = Daemon(storage, env).start()
    try:
        status, _, body = daemon.request("/v2/hello/manifests/latest")
        assert status == 200, body
        assert f"/{channel}.tar.gz" in server.requested
        assert any(f"from {server.url}/{channel}.tar.gz" in line for line in daemon.output)
    finally:
        daemon.stop()
        server.close()
