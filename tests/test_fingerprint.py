"""A path source's fingerprint: what its directory holds now, walked at most once a second."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from nixeryd.build.fingerprint import MISSING, PathFingerprint, fingerprint
from nixeryd.core.offload import inline
from tests.daemon import PKGS


def tree(tmp_path: Path) -> Path:
    root = tmp_path / "pkgs"
    shutil.copytree(PKGS, root)
    return root


def test_unchanged_tree_same_fingerprint(tmp_path: Path) -> None:
    root = tree(tmp_path)
    assert fingerprint(str(root)) == fingerprint(str(root))


def test_every_kind_of_edit_changes_it(tmp_path: Path) -> None:
    """An edit of the same size, a new file, a removed one, a link retargeted, a mode."""
    root = tree(tmp_path)
    seen = {fingerprint(str(root))}
    default = root / "default.nix"
    text = default.read_text()
    default.write_text(text.replace("Hello from nixeryd", "Hello from nixerye"))  # same size
    os.utime(default, ns=(1, 1))
    seen.add(fingerprint(str(root)))
    (root / "new.nix").write_text("{}")
    seen.add(fingerprint(str(root)))
    (root / "new.nix").unlink()
    (root / "link").symlink_to("default.nix")
    seen.add(fingerprint(str(root)))
    (root / "link").unlink()
    (root / "link").symlink_to("system-only")
    seen.add(fingerprint(str(root)))
    default.chmod(0o600)
    seen.add(fingerprint(str(root)))
    assert len(seen) == 6


def test_git_insides_do_not_count(tmp_path: Path) -> None:
    """A fetch into .git changes nothing Nix imports."""
    root = tree(tmp_path)
    (root / ".git").mkdir()
    before = fingerprint(str(root))
    (root / ".git" / "FETCH_HEAD").write_text("abc")
    assert fingerprint(str(root)) == before


def test_missing_path(tmp_path: Path) -> None:
    assert fingerprint(str(tmp_path / "nothing")) == MISSING


def test_walked_at_most_once_per_interval() -> None:
    """Pulls within the interval share one walk; concurrent pulls wait for the same walk."""
    clock = Clock()
    walks: list[Deferred[str]] = []

    def offload(fn: object, root: str) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        walks.append(d)
        return d

    prints = PathFingerprint("/srv/pkgs", offload, clock, interval=1.0)
    first, second = prints.current(), prints.current()
    assert len(walks) == 1
    walks[0].callback("aaa")
    results: list[str] = []
    first.addCallback(results.append)
    second.addCallback(results.append)
    assert results == ["aaa", "aaa"]
    clock.advance(0.5)
    prints.current().addCallback(results.append)
    assert len(walks) == 1 and results[-1] == "aaa"
    clock.advance(0.6)
    later = prints.current()
    assert len(walks) == 2
    walks[1].callback("bbb")
    later.addCallback(results.append)
    assert results[-1] == "bbb"


def test_real_walk_through_inline_offload(tmp_path: Path) -> None:
    root = tree(tmp_path)
    got: list[str] = []
    PathFingerprint(str(root), inline, Clock()).current().addCallback(got.append)
    assert got == [fingerprint(str(root))]
