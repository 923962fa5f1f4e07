"""Running Nix: nix-build of the image's packages, then the runtime closure.

Nix runs as a child process through ``reactor.spawnProcess``; both pipes stream
into a ``NixProcessProtocol`` that logs stderr lines as they arrive and keeps
the tail for error messages. Every child runs in its own process group, so a
build past its deadline is killed whole: SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import json
import math
import os
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessProtocol, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from nixeryd.build.failures import NixBuildFailed, NixTimedOut, build_failure, tail_text
from nixeryd.build.nixoutput import (
    KEPT_LINE,
    MAX_LINE,
    MAX_STDOUT,
    Info,
    LineAssembler,
    parse_closure,
    parse_info,
    shorten,
)
from nixeryd.build.substituters import BinaryCaches, configured_substituters
from nixeryd.core.cache import when_done
from nixeryd.core.offload import Offload, inline
from nixeryd.image.layers import PathInfo

log = Logger()

TAIL_LINES = 40
SHOW_CONFIG_LIMIT = 30.0  # seconds ``nix show-config`` may take: the first build waits for it
SETSID = "setsid"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
DOWNLOAD_SETTINGS = "connect-timeout = 5\nstalled-download-timeout = 10\ndownload-attempts = 2\n"
"""Nix settings every Nix process of nixeryd gets, ahead of the operator's ``NIX_CONFIG``
(which may change them): a package set or cache that cannot be reached fails a build in
seconds, where Nix's defaults (300 s per stalled download, 5 attempts) would leave a
client waiting for many minutes with no word."""


def nix_environment(environ: Mapping[str, str], conf_dir: str | None = None) -> dict[str, str]:
    """The environment Nix runs in: ``environ`` with nixeryd's download settings before the
    operator's ``NIX_CONFIG``, and ``NIX_CONF_DIR`` set to ``conf_dir`` where the host has
    no nix.conf of its own (nixeryd never writes the host's)."""
    env = dict(environ)
    env.setdefault("PATH", DEFAULT_PATH)
    env["NIX_CONFIG"] = DOWNLOAD_SETTINGS + environ.get("NIX_CONFIG", "")
    if conf_dir is not None:
        env["NIX_CONF_DIR"] = conf_dir
    return env


class ProcessReactor(Protocol):
    """What Nix needs of the reactor: ``IReactorProcess`` to start it, ``IReactorTime`` to
    bound it (the global reactor; in tests, a ``Clock`` that records spawns)."""

    def spawnProcess(
        self, processProtocol: IProcessProtocol, executable: str, args: Sequence[str],
        env: Mapping[str, str] | None = None, path: str | None = None, uid: int | None = None,
        gid: int | None = None, usePTY: bool = False, childFDs: Mapping[int, Any] | None = None,
    ) -> IProcessTransport: ...

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kwargs: Any) -> IDelayedCall: ...


class NixBuildResult(Protocol):
    """What a Nix build gives (``NixBuild``), read-only."""

    @property
    def roots(self) -> tuple[str, ...]: ...

    @property
    def closure(self) -> Mapping[str, PathInfo]: ...

    @property
    def named(self) -> Mapping[str, str]: ...

    @property
    def revision(self) -> str | None: ...

    @property
    def main_programs(self) -> Mapping[str, str | None]: ...

    @property
    def meta(self) -> Mapping[str, Mapping[str, str]]: ...

    @property
    def derivers(self) -> Mapping[str, str]: ...


@dataclass(frozen=True)
class NixBuild:
    """What a build gives: the top-level paths and their whole runtime closure."""

    roots: tuple[str, ...]
    closure: Mapping[str, PathInfo]
    named: Mapping[str, str] = field(default_factory=dict)  # package name -> its root
    revision: str | None = None  # the package set's git revision, where Nix knows it
    main_programs: Mapping[str, str | None] = field(default_factory=dict)  # name -> meta.mainProgram
    meta: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # name -> licence, homepage
    derivers: Mapping[str, str] = field(default_factory=dict)  # name -> its root's derivation


@dataclass(frozen=True)
class NixExit:
    """How a Nix process ended."""

    exit_code: int | None  # None when killed by a signal
    signal: int | None
    stdout: bytes
    tail: tuple[str, ...]  # the last stderr lines
    overflowed: bool = False  # stdout was longer than MAX_STDOUT, and not kept


class NixProcessProtocol(ProcessProtocol):
    """Collects stdout (at most ``MAX_STDOUT``), streams stderr lines into the log, keeps
    the tail. Standard error is a log, never data: builders write to it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.ended: Deferred[NixExit] = Deferred()
        self._stdout: list[bytes] = []
        self._stdout_size = 0
        self._overflowed = False
        self._lines = LineAssembler(MAX_LINE)
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)

    def outReceived(self, data: bytes) -> None:
        self._stdout_size += len(data)
        if self._stdout_size > MAX_STDOUT:
            self._overflowed = True
            self._stdout = []
            return
        self._stdout.append(data)

    def errReceived(self, data: bytes) -> None:
        for line, cut in self._lines.feed(data):
            self._line(line, cut)

    def _line(self, raw: bytes, cut: int = 0) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if not line.strip():
            return
        kept = shorten(raw, KEPT_LINE, cut)
        log.info("{line}", line=kept, image=self.label, build_log=True)
        self._tail.append(kept)

    def processEnded(self, reason: Failure) -> None:
        rest = self._lines.flush()
        if rest is not None:
            self._line(*rest)
        exit_code: int | None = 0
        sig: int | None = None
        if isinstance(reason.value, ProcessTerminated):
            exit_code = reason.value.exitCode
            sig = reason.value.signal
        elif not isinstance(reason.value, ProcessDone):
            exit_code = None
        self.ended.callback(
            NixExit(exit_code, sig, b"".join(self._stdout), tuple(self._tail), self._overflowed)
        )


class NixBuilder:
    """Builds package lists with Nix.

    ``timeout`` is handed to ``nix-build --timeout``: the time one derivation's
    builder may take (``NIX_TIMEOUT``, as in Nixery). ``deadline`` bounds a
    whole build, evaluation, downloads and closure query included; past it the
    process group is killed.
    """

    def __init__(
        self,
        reactor: ProcessReactor,
        nix_dir: str,
        environ: Mapping[str, str],
        *,
        timeout: float = 60.0,
        deadline: float = 3600.0,
        kill_grace: float = 5.0,
        killpg: Callable[[int, int], None] = os.killpg,
        conf_dir: str | None = None,
        offload: Offload = inline,
        caches: BinaryCaches | None = None,
    ) -> None:
        self._reactor = reactor
        self._caches = caches
        # Nix's JSON answers (a closure of thousands of paths is tens of MB of parsing)
        # are read off the reactor.
        self._offload = offload
        self._build_nix = os.path.join(nix_dir, "build.nix")
        self._timeout = timeout
        self._deadline = deadline
        self._environ = nix_environment(environ, conf_dir)
        self._kill_grace = kill_grace
        self._killpg = killpg
        self._running: dict[int, tuple[_Killer, Deferred[NixExit]]] = {}
        self._stopping = False

    def stop(self) -> Deferred[None]:
        """Stop every running Nix process group (TERM, then KILL), for shutdown.

        Nix cleans up its builders on SIGTERM; left running, they would outlive us.
        """
        self._stopping = True
        ended = []
        for killer, done in list(self._running.values()):
            if not killer.fired:
                killer.start()
            ended.append(when_done(done))
        return DeferredList(ended).addCallback(lambda _: None)

    async def build(
        self, source: Mapping[str, str], packages: Sequence[str], system: str, *, label: str = ""
    ) -> NixBuild:
        """Build ``packages`` from ``source`` for ``system``; the closure comes with them."""
        deadline = self._reactor.seconds() + self._deadline
        env = await self._environment(label, deadline)
        # Flakes are an experimental feature of Nix still: enabled for the builds that use one.
        features = ["--extra-experimental-features", "flakes"] if source.get("type") == "flake" else []
        arguments = [*features, "--argstr", "source", json.dumps(dict(source), sort_keys=True),
                     "--argstr", "packages", json.dumps(list(packages)), "--argstr", "system", system]
        # What Nix tells nixeryd comes on standard output, as JSON: no builder runs while
        # Nix evaluates, and none can write there.
        evaluated = await self.run(
            ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", self._build_nix,
             "-A", "info", *arguments],
            label, deadline, env,
        )
        if evaluated.exit_code != 0:
            # Names are resolved under tryEval: what fails here is the package set itself.
            raise build_failure(evaluated.tail, source=source, timeout=self._timeout, not_found=None,
                                source_loaded=False)
        info: Info = await self._offload(parse_info, evaluated.stdout, evaluated.overflowed)
        if info.not_found:
            tail: Sequence[str] = ()
            if info.throwing:
                # The first throwing attribute's own message, from evaluating it alone.
                explained = await self.run(
                    ["nix-instantiate", "--eval", "--strict", self._build_nix, "-A", "explain", *arguments],
                    label, deadline, env)
                tail = explained.tail
            raise build_failure(tail, source=source, timeout=self._timeout, not_found=info.not_found,
                                source_loaded=True)
        if not info.derivations:
            raise NixBuildFailed("Nix built nothing for this image")
        built = await self.run(
            ["nix-store", "--realise", "--timeout", f"{math.ceil(self._timeout):d}", *info.derivations],
            label, deadline, env,
        )
        if built.exit_code != 0:
            raise build_failure(built.tail, source=source, timeout=self._timeout, not_found=None,
                                source_loaded=True)
        roots = tuple(sorted(set(info.roots.values())))
        queried = await self.run(
            ["nix", "path-info", "--extra-experimental-features", "nix-command", "--json", "--recursive", *roots],
            label, deadline, env)
        if queried.exit_code != 0:
            raise NixBuildFailed(
                "Nix could not list the image's closure:\n" + tail_text(queried.tail),
                tail_text(queried.tail),
            )
        try:
            closure: dict[str, PathInfo] = await self._offload(parse_closure, queried.stdout)
        except (ValueError, KeyError, TypeError) as e:
            raise NixBuildFailed(f"unreadable closure from Nix: {e}") from None
        missing = set(roots) - set(closure)
        if missing:
            raise NixBuildFailed(f"Nix did not build {', '.join(sorted(missing))}")
        return NixBuild(roots=roots, closure=closure, named=info.roots, revision=info.revision,
                        main_programs=info.programs, meta=info.meta, derivers=info.derivers)

    async def realise(self, paths: Sequence[str], *, label: str = "") -> bool:
        """Bring ``paths`` into this host's store without evaluating anything: derivations
        are built (their inputs are in the store with them), other paths substituted from
        Nix's caches. False, and the reason logged, when Nix cannot."""
        deadline = self._reactor.seconds() + self._deadline
        env = await self._environment(label, deadline)
        realised = await self.run(
            ["nix-store", "--realise", "--timeout", f"{math.ceil(self._timeout):d}", *paths], label, deadline, env)
        if realised.exit_code != 0:
            log.warn("Nix could not bring known paths into the store: {tail}",
                     tail=tail_text(realised.tail), image=label)
            return False
        return True

    def prepare(self) -> None:
        """Find which binary caches answer now, in the background."""
        deadline = self._reactor.seconds() + self._deadline
        Deferred.fromCoroutine(self._environment("start-up", deadline)).addErrback(
            lambda failure: log.warn("cannot ask Nix for its substituters: {error}", error=failure.getErrorMessage()))

    async def _environment(self, label: str, deadline: float) -> Mapping[str, str]:
        """Nix's environment for one build: with only the binary caches that answer."""
        if self._caches is None:
            return self._environ
        line = await self._caches.setting(lambda: self._substituters(label, deadline))
        if not line:
            return self._environ
        return {**self._environ, "NIX_CONFIG": self._environ["NIX_CONFIG"] + "\n" + line}

    async def _substituters(self, label: str, deadline: float) -> list[str]:
        """The substituters Nix uses with nixeryd's settings and the operator's."""
        deadline = min(deadline, self._reactor.seconds() + SHOW_CONFIG_LIMIT)  # a stuck daemon holds none
        shown = await self.run(["nix", "show-config", "--json", "--extra-experimental-features", "nix-command"],
                               label, deadline)
        if shown.exit_code != 0:
            raise NixBuildFailed("nix show-config failed:\n" + tail_text(shown.tail))
        return await self._offload(configured_substituters, shown.stdout)

    async def run(self, argv: Sequence[str], label: str, deadline: float,
                  env: Mapping[str, str] | None = None) -> NixExit:
        """Run one Nix command in its own process group, killed at ``deadline``."""
        protocol = NixProcessProtocol(label)
        # setsid: a process group of its own, to stop it whole at the deadline;
        # setpriv --pdeathsig: Nix is told to stop (and take its builders down)
        # should nixeryd die without the chance to stop it.
        transport = self._reactor.spawnProcess(
            protocol, SETSID, [SETSID, "setpriv", "--pdeathsig", "TERM", *argv],
            env=self._environ if env is None else env, usePTY=False,
        )
        pid: int = transport.pid  # None once the process is reaped
        killer = _Killer(self._reactor, self._killpg, pid, self._kill_grace)
        timer = self._reactor.callLater(max(0.0, deadline - self._reactor.seconds()), killer.start)
        self._running[pid] = (killer, protocol.ended)
        try:
            result = await protocol.ended
        finally:
            del self._running[pid]
            if timer.active():
                timer.cancel()
            killer.stop()
        if self._stopping:
            raise NixBuildFailed("the build was stopped: nixeryd is shutting down")
        if killer.fired:
            log.warn("Nix ran past its deadline and was killed", image=label)
            summary = (f"the build took longer than NIXERY_BUILD_DEADLINE ({self._deadline:g} seconds) and "
                       "was stopped; what it built is kept, so pulling again goes on from there")
            raise NixTimedOut(summary + "\n" + tail_text(result.tail), tail_text(result.tail), summary,
                              "NIXERY_BUILD_DEADLINE", self._deadline)
        return result


class _Killer:
    """Ends a process group: SIGTERM, then SIGKILL after a grace period."""

    def __init__(
        self, reactor: ProcessReactor, killpg: Callable[[int, int], None], pid: int, grace: float
    ) -> None:
        self._reactor = reactor
        self._killpg = killpg
        self._pid = pid
        self._grace = grace
        self._hard: IDelayedCall | None = None
        self.fired = False

    def start(self) -> None:
        self.fired = True
        self._signal(signal.SIGTERM)
        self._hard = self._reactor.callLater(self._grace, self._signal, signal.SIGKILL)

    def stop(self) -> None:
        # The group leader has exited; whatever is left of the group goes too.
        if self.fired:
            self._signal(signal.SIGKILL)
        if self._hard is not None and self._hard.active():
            self._hard.cancel()

    def _signal(self, sig: int) -> None:
        try:
            self._killpg(self._pid, sig)
        except ProcessLookupError:
            pass
        except OSError as e:
            log.warn("cannot signal Nix's process group: {error}", error=str(e))
