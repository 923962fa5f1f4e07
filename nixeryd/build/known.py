"""Images of known packages without Nix.

Every Nix build tells what each name it was asked for resolved to: the default output,
its runtime closure, its main program, licence and homepage, and the package set's
revision. That is remembered in storage per package set (its identity: a pinned commit,
a moving channel, a path source's content, a git ref), system and name
(``records.Resolution``), so every instance of a fleet shares it. A new image whose
names are all known (meta-packages' and base packages included) is then assembled from
those answers, exactly as from Nix's: the same roots, closure, programs and licences, so
the same layers and digests, and no Nix process at all when the closure's paths are in
this host's store. A path missing here is built again from its recorded derivation, or
substituted from Nix's caches, without evaluating anything. Names not known yet (or whose
answer is older than the cache TTL of a moving package set) are Nix's to answer, and only
they: the others are taken as recorded, unless the answers turn out to come from different
revisions of a moving package set, which Nix then answers whole. Every answer Nix gives is
remembered in turn.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Lookup:
    """What the records of an image's names give: its build, when they give all of it;
    else the names Nix must resolve, or what to bring into this host's store first."""

    build: NixBuild | None = None
    unknown: tuple[str, ...] = ()  # names without a usable record
    realise: tuple[str, ...] = ()  # derivations or outputs that make the missing paths


def _looked_up(identity: str, system: str, names: list[str], found: list[bytes | None],
               ttl: float | None, now: float, store: re.Pattern[str]) -> Lookup:
    """Blocking (records hold closures of thousands of paths, each then stat'ed): what the
    records of ``names`` give. A name whose record is missing, damaged or stale is unknown;
    records from different fetches of a moving package set make every name unknown."""
    resolutions, unknown = [], []
    for name, data in zip(names, found, strict=True):
        resolution = Resolution.decode(data)
        if (resolution is None
                or (resolution.identity, resolution.system, resolution.name) != (identity, system, name)
                or (ttl is not None and now - resolution.recorded > ttl)
                # Paths are read into layers and handed to Nix: store paths only.
                or not all(store.fullmatch(p) for p in (resolution.deriver or resolution.out, *resolution.closure))):
            unknown.append(name)
        else:
            resolutions.append(resolution)
    if unknown:
        return Lookup(unknown=tuple(unknown))
    if len({r.revision for r in resolutions}) != 1:
        return Lookup(unknown=tuple(names))
    closure: dict[str, PathInfo] = {}
    realise: set[str] = set()
    for resolution in resolutions:
        for path, (references, size) in resolution.closure.items():
            closure[path] = PathInfo(path, references, size)
            if not os.path.lexists(path):
                # Its derivation builds it again, with whatever else its closure lacks;
                # without one here, Nix's caches may have the output.
                deriver = resolution.deriver
                realise.add(deriver if deriver is not None and os.path.exists(deriver) else resolution.out)
    if realise:
        return Lookup(realise=tuple(sorted(realise)))
    named = {r.name: r.out for r in resolutions}
    return Lookup(NixBuild(
        roots=tuple(sorted(set(named.values()))), closure=closure, named=named,
        revision=resolutions[0].revision, main_programs={r.name: r.program for r in resolutions},
        meta={r.name: dict(r.meta) for r in resolutions if r.meta},
        derivers={r.name: r.deriver for r in resolutions if r.deriver is not None},
    ))


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
            revision=built.revision, recorded=now, deriver=built.derivers.get(name),
        )
        records.append((resolved_key(identity, system, name), resolution.encode()))
    return records


class KnownPackages:
    """What names resolved to, per package set, in ``storage``."""

    def __init__(self, storage: IStorage, offload: Offload, clock: IReactorTime,
                 store_dir: str = "/nix/store") -> None:
        self._storage = storage
        self._store = re.compile(re.escape(store_dir) + r"/[0-9a-z]{32}-[^/]+")
        self._offload = offload
        self._clock = clock

    async def look_up(self, identity: str, system: str, packages: Iterable[str],
                      ttl: float | None) -> Lookup:
        """The build of ``packages`` as Nix would give it, from remembered answers no older
        than ``ttl`` (None: a package set that never changes), or what stands in its way."""
        names = sorted(set(packages))
        try:
            found = await gather([self._storage.get(resolved_key(identity, system, name)) for name in names])
        except StorageError as e:
            log.warn("cannot read what names resolved to: {error}", error=str(e))
            return Lookup(unknown=tuple(names))
        return await self._offload(_looked_up, identity, system, names, found, ttl, self._clock.seconds(),
                                   self._store)

    async def remember(self, identity: str, system: str, built: NixBuildResult) -> None:
        """Keep what each name of ``built`` resolved to; a storage failure is only logged."""
        encoded = await self._offload(_encoded, identity, system, built, self._clock.seconds())
        writes = [self._storage.put(key, data, JSON) for key, data in encoded]
        try:
            await gather(writes)
        except StorageError as e:
            log.warn("cannot remember what names resolved to: {error}", error=str(e))

