"""Fakes for the edges unit tests cannot run: the Nix child process.

``FakeNix`` stands where ``nixeryd.build.nix.NixBuilder`` runs Nix: it answers
from a small tree of directories shaped like store paths, and lets a test hold
a build pending until it fires it. End-to-end tests run the real Nix.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from twisted.internet.defer import Deferred, succeed

from nixeryd.build.failures import NixBuildFailed, PackagesNotFound
from nixeryd.build.nix import NixBuild
from nixeryd.image.layers import PathInfo


def make_store(root: Path, packages: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Directories standing for store paths: name -> path; each package lists its dependencies."""
    paths = {}
    for name in packages:
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        path = root / f"{digest}-{name}"
        (path / "bin").mkdir(parents=True)
        paths[name] = str(path)
    for name, deps in packages.items():
        script = "#!/bin/sh\n" + "".join(f"# uses {paths[d]}\n" for d in deps) + f"echo {name}\n"
        exe = Path(paths[name]) / "bin" / name
        exe.write_text(script)
        exe.chmod(0o555)
    return paths


@dataclass
class FakeNix:
    """Builds by looking packages up in a fake store; records every call."""

    store: Mapping[str, str]
    dependencies: Mapping[str, Sequence[str]]
    hold: bool = False
    broken: Sequence[str] = ()  # packages whose build fails, as a failing builder does
    programs: Mapping[str, str] = field(default_factory=dict)  # name -> meta.mainProgram
    licences: Mapping[str, str] = field(default_factory=dict)  # name -> meta.license
    revision: str | None = None
    calls: list[tuple[str, ...]] = field(default_factory=list)
    realised: list[tuple[str, ...]] = field(default_factory=list)
    pending: list[Deferred[NixBuild]] = field(default_factory=list)
    _results: list[NixBuild] = field(default_factory=list)

    def build(self, source: Mapping[str, str], packages: Sequence[str], system: str,
              *, label: str = "") -> Deferred[NixBuild]:
        self.calls.append(tuple(packages))
        missing = tuple(p for p in packages if p not in self.store)
        if missing:
            d: Deferred[NixBuild] = Deferred()
            d.errback(PackagesNotFound("packages not found: " + ", ".join(missing), "", missing))
            return d
        failing = [p for p in packages if p in self.broken]
        if failing:
            d = Deferred()
            d.errback(NixBuildFailed(f"builder for {failing[0]} failed with exit code 3"))
            return d
        result = self._result(packages)
        if not self.hold:
            return succeed(result)
        d = Deferred()
        self.pending.append(d)
        self._results.append(result)
        return d

    def realise(self, paths: Sequence[str], *, label: str = "") -> Deferred[bool]:
        """As ``nix-store --realise`` of outputs with a binary cache: a path moved aside to
        ``<path>.cached`` is "in the cache" and comes back; any other missing path fails."""
        self.realised.append(tuple(paths))
        for path in paths:
            cached = Path(path + ".cached")
            if not Path(path).exists() and cached.exists():
                cached.rename(path)
        return succeed(all(Path(p).exists() for p in paths))

    def release(self) -> None:
        """Fire every held build."""
        pending, results = self.pending, self._results
        self.pending, self._results = [], []
        for d, result in zip(pending, results, strict=True):
            d.callback(result)

    def _result(self, packages: Sequence[str]) -> NixBuild:
        closure: dict[str, PathInfo] = {}
        todo = list(packages)
        while todo:
            name = todo.pop()
            path = self.store[name]
            if path in closure:
                continue
            deps = tuple(self.dependencies.get(name, ()))
            refs = tuple(sorted(self.store[d] for d in deps))
            size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
            closure[path] = PathInfo(path=path, references=refs, nar_size=size)
            todo.extend(deps)
        roots = tuple(sorted({self.store[p] for p in packages}))
        # Real Nix names the output each package stands for (build.nix's roots line).
        return NixBuild(roots=roots, closure=closure, named={p: self.store[p] for p in packages},
                        revision=self.revision,
                        main_programs={p: self.programs.get(p) for p in packages},
                        meta={p: {"license": self.licences[p]} for p in packages if p in self.licences})
