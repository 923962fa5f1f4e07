"""Popularity data for layering: package name -> number of references.

From a file (read once, at start-up, so a bad file stops start-up) or a URL
(fetched at the first build and kept; a failed fetch is retried next time).
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping

from twisted.logger import Logger

from nixeryd.layers import package_name, parse_popularity

log = Logger()

Fetch = Callable[[str], Awaitable[bytes]]


class PopularityUnavailable(Exception):
    """The popularity data could not be fetched."""


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def read_popularity_file(path: str) -> dict[str, int]:
    """Blocking, for start-up: the popularity file at ``path``; ValueError on bad data."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    return parse_popularity(data)


class Popularity:
    """The popularity table, loaded once and shared by every build."""

    def __init__(self, table: Mapping[str, int] | None = None, url: str | None = None,
                 fetch: Fetch | None = None) -> None:
        self._table: Mapping[str, int] | None = dict(table) if table is not None else None
        self._url = url
        self._fetch = fetch
        if self._table is None and (url is None or fetch is None):
            self._table = {}

    async def __call__(self) -> Mapping[str, int]:
        if self._table is not None:
            return self._table
        assert self._url is not None and self._fetch is not None
        try:
            data = await self._fetch(self._url)
            table = parse_popularity(data)
        except Exception as e:
            log.error("cannot load popularity data: {error}", error=str(e))
            raise PopularityUnavailable("popularity data is unavailable: " + str(e)) from None
        log.info("loaded popularity data for {count} packages", count=len(table))
        self._table = table
        return table


def treq_fetch(client: Any) -> Fetch:
    """A Fetch that GETs a URL with a treq client; non-200 is an error."""

    async def fetch(url: str) -> bytes:
        response = await client.get(url)
        if response.code != 200:
            raise ValueError(f"HTTP {response.code} from the popularity URL")
        body: bytes = await response.content()
        return body

    return fetch


def count_references(derivations: Mapping[str, Any]) -> dict[str, int]:
    """Package name -> how many derivations take it as an input, from
    ``nix show-derivation --recursive`` output."""
    counts: dict[str, int] = {}
    for info in derivations.values():
        for input_drv in (info.get("inputDrvs") or {}):
            name = package_name(input_drv).removesuffix(".drv")
            counts[name] = counts.get(name, 0) + 1
    return counts


async def compute_popularity(
    reactor: Any, nix_dir: str, source: Mapping[str, str], environ: Mapping[str, str],
    *, system: str = "x86_64-linux", timeout: float = 3600,
) -> dict[str, int]:
    """Popularity of every package of the package set, from its build graph."""
    import json
    import os

    from nixeryd.nix import NixBuilder, NixBuildFailed

    nix = NixBuilder(reactor, nix_dir, timeout, environ)
    deadline = reactor.seconds() + timeout
    listed = await nix.run(
        ["nix-instantiate", os.path.join(nix_dir, "popularity.nix"),
         "--argstr", "source", json.dumps(dict(source), sort_keys=True), "--argstr", "system", system],
        "popularity", deadline,
    )
    if listed.exit_code != 0:
        raise NixBuildFailed("Nix could not list the package set:\n" + "\n".join(listed.tail[-10:]))
    drvs = sorted({line for line in listed.stdout.decode().split() if line.endswith(".drv")})
    if not drvs:
        return {}
    derivations: dict[str, Any] = {}
    for start in range(0, len(drvs), 1000):  # keep command lines well below the kernel's limit
        shown = await nix.run(
            ["nix", "show-derivation", "--extra-experimental-features", "nix-command",
             "--recursive", *drvs[start:start + 1000]],
            "popularity", deadline,
        )
        if shown.exit_code != 0:
            raise NixBuildFailed("Nix could not show the derivations:\n" + "\n".join(shown.tail[-10:]))
        derivations.update(json.loads(shown.stdout))
    return count_references(derivations)
