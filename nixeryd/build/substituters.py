"""Binary caches that answer: no build waits on one that does not.

Nix asks each of its substituters about every path it is to build or fetch, and one it
cannot reach costs every Nix process its timeouts: a moment for a host name that does not
resolve, ``connect-timeout`` per attempt for an address a firewall drops, and
``stalled-download-timeout`` per attempt for a cache that takes the connection and never
answers. Nix forgets that within the process; nixeryd starts one per build. So nixeryd
reads the substituters Nix would use (``nix show-config``, the operator's settings
included), asks each HTTP one for its ``nix-cache-info`` before the first build (all at
once, ``PROBE_TIMEOUT`` seconds at most) and again every ``PROBE_INTERVAL`` seconds in the
background, and hands Nix only those that answered. Caches of other kinds (``file://``,
``s3://``, ``ssh://``) are handed on as they are. Any HTTP answer counts: a private cache
may ask for the credentials Nix has and nixeryd does not.
"""
from __future__ import annotations

import http.client
import json
from typing import Awaitable, Callable, Sequence
from urllib.error import HTTPError
from urllib.parse import urlsplit, urlunsplit
from urllib.request import Request, urlopen

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from nixeryd.build.pkgsource import public_url
from nixeryd.core.cache import when_done
from nixeryd.core.offload import Offload

log = Logger()

PROBE_TIMEOUT = 3.0
PROBE_INTERVAL = 60.0


def answers(url: str, timeout: float) -> bool:
    """Blocking: whether the binary cache at ``url`` answers an HTTP request in time."""
    parts = urlsplit(url)  # settings such as ?priority=10 are Nix's, not the server's
    info = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/nix-cache-info", "", ""))
    try:
        request = Request(info, headers={"User-Agent": "nixeryd"})
        with urlopen(request, timeout=timeout) as response:  # noqa: S310 (http and https only)
            response.read(4096)
        return True
    except HTTPError:
        return True
    except (OSError, ValueError, http.client.HTTPException):
        return False


def configured_substituters(show_config: bytes) -> list[str]:
    """The substituters in ``nix show-config --json``'s answer."""
    value = json.loads(show_config)["substituters"]["value"]
    if not (isinstance(value, list) and all(isinstance(url, str) for url in value)):
        raise ValueError("substituters is not a list of URLs")
    return value


class BinaryCaches:
    """Which of Nix's substituters answer, and the setting that leaves out the others."""

    def __init__(self, clock: IReactorTime, offload: Offload,
                 probe: Callable[[str, float], bool] = answers,
                 timeout: float = PROBE_TIMEOUT, interval: float = PROBE_INTERVAL) -> None:
        self._clock = clock
        self._offload = offload
        self._probe = probe
        self._timeout = timeout
        self._interval = interval
        self._configured: list[str] | None = None
        self._down: frozenset[str] = frozenset()
        self._probed = float("-inf")
        self._first: Deferred[None] | None = None
        self._again: Deferred[None] | None = None

    async def setting(self, load: Callable[[], Awaitable[Sequence[str]]]) -> str:
        """The ``NIX_CONFIG`` line handing Nix only the substituters that answer ("" when
        all do). The first call reads them with ``load`` and probes them, and every call
        waits for that; later probes run in the background."""
        if self._first is None:
            self._first = Deferred.fromCoroutine(self._load_and_probe(load))
        if not self._first.called:
            await when_done(self._first)
        elif self._clock.seconds() - self._probed >= self._interval and self._again is None:
            self._again = Deferred.fromCoroutine(self._probe_all())
            self._again.addBoth(self._probed_again)
        return self._line()

    def _probed_again(self, result: object) -> None:
        self._again = None

    def _line(self) -> str:
        if not self._down or self._configured is None:
            return ""
        kept = [url for url in self._configured if url not in self._down]
        return "substituters = " + " ".join(kept) + "\n"

    async def _load_and_probe(self, load: Callable[[], Awaitable[Sequence[str]]]) -> None:
        try:
            self._configured = list(await load())
        except Exception as e:
            log.warn("cannot read Nix's substituters, so every one is used as it is: {error}", error=str(e))
            self._configured = []
        await self._probe_all()

    async def _probe_all(self) -> None:
        urls = [url for url in self._configured or () if url.startswith(("http://", "https://"))]
        self._probed = self._clock.seconds()
        if not urls:
            return
        checks = []
        for url in urls:
            check = self._offload(self._probe, url, self._timeout)
            # A probe is bounded by its socket timeouts; this bounds one that trickles.
            check.addTimeout(self._timeout + 1, self._clock, lambda result, timeout: False)
            check.addErrback(lambda failure: False)
            checks.append(check)
        results: list[bool] = await gatherResults(checks)
        down = frozenset(url for url, up in zip(urls, results, strict=True) if not up)
        for url in sorted(down - self._down):
            log.warn("binary cache {url} does not answer: Nix is not asked to use it until it does",
                     url=public_url(url))
        for url in sorted(self._down - down):
            log.info("binary cache {url} answers again", url=public_url(url))
        self._down = down
