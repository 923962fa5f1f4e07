"""A fleet on one storage: real instances, one build per image, failures and tags shared,
a lease holder killed mid-build and taken over. Nix runs are counted through a
``nix-instantiate`` wrapper first on the daemons' PATH."""
from __future__ import annotations

import json
import secrets
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest

from tests.daemon import Daemon, NixCounter, daemon_environment, manifest_digest
from tests.emulator import guarded_emulator, shared_emulator
from tests.moto import shared_moto
from tests.test_gcs_end_to_end import gcs_environment
from tests.test_s3_end_to_end import s3_environment

Environments = Callable[[Path, int], list[dict[str, str]]]


def shared_directory(tmp_path: Path, count: int) -> list[dict[str, str]]:
    """Instances on one directory, as on a shared file system."""
    return [daemon_environment(tmp_path / "storage") for _ in range(count)]


def gcs_bucket(tmp_path: Path, count: int) -> list[dict[str, str]]:
    """Instances on one bucket of the emulator, reached as GCS is, with its preconditions."""
    bucket = shared_emulator().new_bucket()
    return [gcs_environment(tmp_path / f"local{i}", guarded_emulator(), bucket) for i in range(count)]


def s3_bucket(tmp_path: Path, count: int) -> list[dict[str, str]]:
    """Instances on one bucket of moto's S3 server."""
    moto = shared_moto()
    bucket = moto.new_bucket()
    return [s3_environment(tmp_path / f"local{i}", moto, bucket) for i in range(count)]


STORAGES: dict[str, Environments] = {"directory": shared_directory, "gcs": gcs_bucket, "s3": s3_bucket}


def start_fleet(tmp_path: Path, storage: str, counter: NixCounter, pkgs: Path, count: int = 2,
                **extra: str) -> list[Daemon]:
    daemons = []
    for i, env in enumerate(STORAGES[storage](tmp_path, count)):
        env = counter.env(dict(env, NIXERY_PKGS_PATH=str(pkgs), **extra))
        daemons.append(Daemon(tmp_path / f"instance{i}", env).start())
    return daemons


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_twelve_cold_pulls_on_two_instances_run_nix_once(
    storage: str, tmp_path: Path, counter: NixCounter, private_pkgs: Path
) -> None:
    """Twelve concurrent pulls of one image nobody built, spread over two instances on one
    storage: one Nix build in all, and every pull gets the same manifest. The image takes
    seconds to build, so the second instance surely asks while the first builds."""
    (private_pkgs / "slow-nonce").write_text(secrets.token_hex(8))
    one, two = start_fleet(tmp_path, storage, counter, private_pkgs)
    names = ["shell/slow/alpha", "shell/alpha/slow"] * 6
    with ThreadPoolExecutor(12) as pool:
        digests = list(pool.map(lambda i: manifest_digest((one, two)[i % 2], names[i]), range(12)))
    assert len(set(digests)) == 1
    assert counter.calls == 1
    waited = [d for d in (one, two) if "is building" in d.log]
    assert len(waited) == 1, one.log + two.log
    # The lease is gone once the image is built; the record stays.
    if storage == "directory":
        assert list((tmp_path / "storage" / "leases").glob("[0-9a-f]*")) == []


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_a_failure_is_shared_by_the_fleet(
    storage: str, tmp_path: Path, counter: NixCounter, private_pkgs: Path
) -> None:
    """A build that fails on one instance is answered with the same error by the other,
    without running Nix again, for the failure TTL; a name not in the set is not shared."""
    one, two = start_fleet(tmp_path, storage, counter, private_pkgs)
    status, _, body = one.request("/v2/broken/manifests/latest")
    assert status == 422, body
    assert counter.calls == 1
    status, _, again = two.request("/v2/broken/manifests/latest")
    assert status == 422
    assert json.loads(again)["errors"][0]["message"] == json.loads(body)["errors"][0]["message"]
    assert counter.calls == 1
    status, _, body = two.request("/v2/alpha/no-such-package/manifests/latest")
    assert status == 404
    status, _, again = one.request("/v2/alpha/no-such-package/manifests/latest")
    assert status == 404 and json.loads(again) == json.loads(body)
    # A made-up name is each instance's to find (nothing is written for it), and each
    # remembers it: asking again runs Nix on neither.
    assert counter.calls == 3
    for instance in (one, two):
        assert instance.request("/v2/alpha/no-such-package/manifests/latest")[0] == 404
    assert counter.calls == 3


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_a_holder_killed_mid_build_is_taken_over(
    storage: str, tmp_path: Path, counter: NixCounter, private_pkgs: Path
) -> None:
    """The instance holding an image's lease is SIGKILLed while Nix builds; the other
    instance, waiting on the same image, takes the lease over once it expires, builds the
    image itself and answers its client."""
    (private_pkgs / "slow-nonce").write_text(secrets.token_hex(8))
    one, two = start_fleet(tmp_path, storage, counter, private_pkgs, NIXERY_BUILD_LEASE_TTL="3")
    building = threading.Event()
    one.on_line.append(lambda line: building.set() if "slow-1.0: building" in line else None)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(one.request, "/v2/slow/manifests/latest")
        assert building.wait(60), one.log
        second = pool.submit(two.request, "/v2/slow/manifests/latest")
        assert two.logged("is building"), two.log
        assert one.process is not None
        one.process.send_signal(signal.SIGKILL)
        assert first.result(timeout=60)[0] == 599
        status, headers, body = second.result(timeout=120)
    assert status == 200, body
    assert "expired; taking the build over" in two.log
    assert counter.calls == 2
    assert manifest_digest(two, "slow") == headers["Docker-Content-Digest"]


@pytest.mark.parametrize("storage", sorted(STORAGES))
def test_tags_and_catalogue_are_the_fleets(
    storage: str, tmp_path: Path, counter: NixCounter, private_pkgs: Path
) -> None:
    """A tag pulled from one instance is listed by the other, and by both after they
    restart; the catalogue too."""
    one, two = start_fleet(tmp_path, storage, counter, private_pkgs)
    assert one.request("/v2/hello/manifests/v1.2")[0] == 200
    assert two.request("/v2/alpha/manifests/latest")[0] == 200
    for daemon in (one, two):
        status, _, body = daemon.request("/v2/hello/tags/list")
        assert status == 200 and json.loads(body)["tags"] == ["latest", "v1.2"]
    for daemon in (one, two):
        daemon.stop()
        daemon.start()
    for daemon in (two, one):
        assert json.loads(daemon.request("/v2/hello/tags/list")[2])["tags"] == ["latest", "v1.2"]
        assert json.loads(daemon.request("/v2/_catalog")[2])["repositories"] == ["alpha", "hello"]
