"""Popularity data for layering: package name -> number of references.

Loaded once, at start-up, from a file or a URL (as Nixery does): a file that
cannot be read or a URL that does not answer within the timeout stops
start-up, and no build ever waits for it.
"""
from __future__ import annotations

import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any, Mapping

from nixeryd.image.layers import package_name, parse_popularity

if TYPE_CHECKING:
    from nixeryd.build.nix import ProcessReactor

LOAD_TIMEOUT = 30.0


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://", "file://"))


def load_popularity(location: str, *, timeout: float = LOAD_TIMEOUT) -> dict[str, int]:
    """Blocking, for start-up: the popularity data at ``location``, a URL or a file;
    ValueError, with one line saying why, when it cannot be had or read."""
    if is_url(location):
        try:
            with urllib.request.urlopen(location, timeout=timeout) as response:
                data = response.read()
        except urllib.error.HTTPError as e:
            raise ValueError(f"HTTP {e.code} from {location}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise ValueError(f"cannot fetch {location}: {reason}") from None
    else:
        try:
            with open(location, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ValueError(f"cannot read {location}: {e.strerror}") from None
    return parse_popularity(data)


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
    reactor: ProcessReactor, nix_dir: str, source: Mapping[str, str], environ: Mapping[str, str],
    *, system: str = "x86_64-linux", timeout: float = 3600, conf_dir: str | None = None,
) -> dict[str, int]:
    """Popularity of every package of the package set, from its build graph."""
    import json
    import os

    from nixeryd.build.failures import NixBuildFailed
    from nixeryd.build.nix import NixBuilder

    nix = NixBuilder(reactor, nix_dir, environ, deadline=timeout, conf_dir=conf_dir)
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
