"""Known packages without Nix, with the real Nix and the real daemon: a new combination of
names already resolved starts no Nix process, and its digest is the one an instance that
never saw those names builds with Nix."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.daemon import Daemon, NixCounter, daemon_environment, manifest_digest


def test_known_names_make_an_image_without_nix(tmp_path: Path) -> None:
    counter = NixCounter(tmp_path / "counter")
    storage = tmp_path / "storage"
    daemon = Daemon(storage, counter.env(daemon_environment(storage))).start()
    try:
        for name in ("hello", "git", "htop"):
            manifest_digest(daemon, name)
        assert counter.calls == 3
        known = {name: manifest_digest(daemon, name) for name in ("git/hello", "run/hello/git", "shell/hello")}
        # shell/ needs the shell's packages, which nobody asked for yet: Nix is asked for
        # those alone, not for hello or the base packages it already answered.
        assert counter.calls == 4
        assert "hello" not in counter.asked[3] and "bashInteractive" in counter.asked[3]
        assert not {"cacert", "iana-etc"} & set(counter.asked[3])
        status, _, body = daemon.request("/v2/nonroot/htop/hello/git/manifests/latest")
        assert status == 200, body
        assert counter.calls == 4

        # htop's output collected from this host's store: its recorded derivation builds
        # it again, with no evaluation.
        records = [json.loads(p.read_bytes()) for p in (storage / "resolved").iterdir()]
        assert len(records) >= 5
        htop = next(r for r in records if r["name"] == "htop")
        assert htop["deriver"].endswith(".drv")
        subprocess.run(["nix-store", "--delete", htop["out"]], check=True, capture_output=True,
                       env=daemon_environment(storage))
        assert not Path(htop["out"]).exists()
        known["git/htop"] = manifest_digest(daemon, "git/htop")
        assert counter.calls == 4
        assert Path(htop["out"]).exists()
        assert any("realised without evaluation" in line for line in daemon.output)
    finally:
        daemon.stop()

    # Each image again on storage of its own, where nothing is known: Nix builds it.
    for number, (name, digest) in enumerate([*known.items(), ("nonroot/htop/hello/git", None)]):
        fresh_counter = NixCounter(tmp_path / f"counter-{number}")
        fresh_storage = tmp_path / f"fresh-{number}"
        fresh = Daemon(fresh_storage, fresh_counter.env(daemon_environment(fresh_storage))).start()
        try:
            status, headers, again = fresh.request(f"/v2/{name}/manifests/latest")
            assert status == 200, again
            assert fresh_counter.calls == 1
            if digest is None:
                assert again == body
            else:
                assert headers["Docker-Content-Digest"] == digest, name
        finally:
            fresh.stop()
