"""Images of known packages without Nix.

Every Nix build tells what each name it was asked for resolved to: the default output,
its runtime closure, its main program, licence and homepage, and the package set's
revision. That is remembered in storage per package set (its identity: a pinned commit,
a moving channel, a path source's content, a git ref), system and name
(``records.Resolution``), so every instance of a fleet shares it. A new image whose
names are all known (meta-packages' and base packages included) is then assembled from
those answers, exactly as from Nix's: the same roots, closure, programs and licences, so
the same layers and digests, and no Nix process at all when the closure's paths are in
this host's store. Anything else (a name not known yet, answers from different revisions
of a moving package set, a path missing here, an answer older than the cache TTL of a
moving package set) is Nix's to answer, and its answer is remembered in turn.
"""
from __future__ import annotations

import os
from typing import Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from nixeryd.build.nix import NixBuild, NixBuildResult
from nixeryd.core.cache import gather
from nixeryd.core.offload import Offload
from nixeryd.image.layers import PathInfo, closure_of
from nixeryd.storage.interface import IStorage, StorageError
from nixeryd.storage.records import JSON, Resolution, resolved_key

log = Logger()


def _assembled(identity: str, system: str, names: list[str], found: list[bytes | None],
               ttl: float | None, now: float) -> NixBuild | None:
    """Blocking (records hold closures of thousands of paths, each then stat'ed): the build
    the records of ``names`` give, or None when one is missing, stale, of another revision,
    or names a path this host does not have."""
    resolutions = []
    for name, data in zip(names, found, strict=True):
        resolution = Resolution.decode(data)
        if resolution is None or (resolution.identity, resolution.system, resolution.name) != (
                identity, system, name):
            return None
        if ttl is not None and now - resolution.recorded > ttl:
            return None
        resolutions.append(resolution)
    if len({r.revision for r in resolutions}) != 1:
        return None  # answers from different fetches of a moving package set
    closure: dict[str, PathInfo] = {}
    for resolution in resolutions:
        for path, (references, size) in resolution.closure.items():
            closure[path] = PathInfo(path, references, size)
    if not all(os.path.lexists(path) for path in closure):
        return None
    named = {r.name: r.out for r in resolutions}
    return NixBuild(
        roots=tuple(sorted(set(named.values()))), closure=closure, named=named,
        revision=resolutions[0].revision, main_programs={r.name: r.program for r in resolutions},
        meta={r.name: dict(r.meta) for r in resolutions if r.meta},
    )


def _encoded(identity: str, system: str, built: NixBuildResult, now: float) -> list[tuple[str, bytes]]:
    """Blocking: each name's record of ``built``, keyed and encoded."""
    records = []
    for name, out in sorted(built.named.items()):
        if out not in built.closure:
            continue
        paths = closure_of([out], built.closure)
        resolution = Resolution(
            identity=identity, system=system, name=name, out=out,
            closure={p: (built.closure[p].references, built.closure[p].nar_size) for p in sorted(paths)},
            program=built.main_programs.get(name), meta=dict(built.meta.get(name, {})),
            revision=built.revision, recorded=now,
        )
        records.append((resolved_key(identity, system, name), resolution.encode()))
    return records


class KnownPackages:
    """What names resolved to, per package set, in ``storage``."""

    def __init__(self, storage: IStorage, offload: Offload, clock: IReactorTime) -> None:
        self._storage = storage
        self._offload = offload
        self._clock = clock

    async def resolve(self, identity: str, system: str, packages: Iterable[str],
                      ttl: float | None) -> NixBuild | None:
        """The build of ``packages`` as Nix would give it, from remembered answers no older
        than ``ttl`` (None: a package set that never changes); None when Nix must answer."""
        names = sorted(set(packages))
        try:
            found = await gather([self._storage.get(resolved_key(identity, system, name)) for name in names])
        except StorageError as e:
            log.warn("cannot read what names resolved to: {error}", error=str(e))
            return None
        return await self._offload(_assembled, identity, system, names, found, ttl, self._clock.seconds())

    async def remember(self, identity: str, system: str, built: NixBuildResult) -> None:
        """Keep what each name of ``built`` resolved to; a storage failure is only logged."""
        encoded = await self._offload(_encoded, identity, system, built, self._clock.seconds())
        writes = [self._storage.put(key, data, JSON) for key, data in encoded]
        try:
            await gather(writes)
        except StorageError as e:
            log.warn("cannot remember what names resolved to: {error}", error=str(e))

