"""Why Nix did not give an image: the errors a build ends with, and how the end of
Nix's output is read into them.

Each error has a ``summary``, one line a person reads first (it becomes the HTTP
reason phrase, the one text every registry client prints, and the first line of
the index page's list of failures), and a ``message`` that may go on with the
builder's log. Pure.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from nixeryd.build.pkgsource import public_url

NOT_FOUND_MARKER = re.compile(r"nixeryd-not-found: (\[.*\])")
# How Nix reports a derivation stopped by `--timeout`.
DERIVATION_TIMED_OUT = re.compile(
    r"(?:building of '(/nix/store/[^'!]+\.drv)(?:![^']*)?'(?: from \.drv file)? )?timed out after \d+ seconds")
# How Nix 2.x reports a derivation that failed, and one no builder here can build.
FAILED_BUILDER = re.compile(r"builder for '(/nix/store/[^']+\.drv)' failed(?: with exit code (\d+))?")
CANNOT_BUILD_ON = re.compile(r"^cannot build on '([^']+)': (?:error: )*(.+)$")
NO_BUILD_STARTED = "unable to start any build"
WRONG_PLATFORM = re.compile(
    r"a '([^']+)'(?: with features \{[^}]*\})? is required to build '(/nix/store/[^']+\.drv)', but I am a '([^']+)'"
)
# Lines of Nix's own around a builder's log: not what a person looks for in it.
NIX_CHATTER = re.compile(
    r"^(building '|these \d+ (derivations|paths) will be|this (derivation|path) will be|"
    r"  /nix/store/|trace: |warning: |copying path |error: |fatal: |For full logs|"
    r"\(use '--show-trace'|querying info|downloading '|unpacking '|fetching |       )"
)
NIX_CLOSING = re.compile(r"^(error: |\s+\S|\(use '--show-trace'|For full logs)")
"""Lines of the block of errors Nix ends a failed build with."""
QUOTED_LOG = re.compile(r"^\s+> (.*\S.*)$")
SHOW_TRACE_HINT = "(use '--show-trace'"
MESSAGE_LINES = 12
MAX_MESSAGE = 4096
"""Most characters of Nix's output in one error message (it goes to every client)."""
SOURCE_SETTINGS = ("NIXERY_CHANNEL (fetched from NIXERY_CHANNEL_URL), NIXERY_PKGS_REPO, NIXERY_PKGS_FLAKE "
                   "or NIXERY_PKGS_PATH")


class NixError(Exception):
    """Nix did not give the image. ``summary`` is one line saying why, for the places
    where only one line reaches a person; ``message`` may go on with the end of
    Nix's log."""

    def __init__(self, message: str, log_tail: str = "", summary: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail
        self.summary = summary if summary is not None else message.split("\n", 1)[0]
        # Seconds until asking again can give another answer (the failure is remembered
        # that long), where known.
        self.retry_after: float | None = None


class PackagesNotFound(NixError):
    """Some packages are not in the package set, or their attributes throw;
    ``reason`` is Nix's own message for one that throws, else empty."""

    def __init__(
        self, message: str, log_tail: str, packages: Sequence[str], reason: str = ""
    ) -> None:
        super().__init__(message, log_tail)
        self.packages = tuple(packages)
        self.reason = reason


class NixBuildFailed(NixError):
    """Evaluation, a build, or the closure query failed. ``derivation`` is the one whose
    builder failed, where Nix named it."""

    def __init__(self, message: str, log_tail: str = "", summary: str | None = None,
                 derivation: str | None = None) -> None:
        super().__init__(message, log_tail, summary)
        self.derivation = derivation


class PlatformUnavailable(NixError):
    """No builder Nix knows of can build for the image's platform."""

    def __init__(self, message: str, log_tail: str, wanted: str, here: str) -> None:
        super().__init__(message, log_tail)
        self.wanted = wanted
        self.here = here


class SourceUnavailable(NixError):
    """The package set could not be fetched or loaded: nothing was built."""


class BuildersUnavailable(NixError):
    """The build was for Nix's remote builders alone, and none of them could take it:
    one that is down comes back, so asking again later can succeed."""


class NixTimedOut(NixError):
    """The build ran past a time limit and was stopped: ``limit`` names the setting
    (``NIX_TIMEOUT`` for one derivation, ``NIXERY_BUILD_DEADLINE`` for the whole build)."""

    def __init__(self, message: str, log_tail: str = "", summary: str | None = None,
                 limit: str = "NIXERY_BUILD_DEADLINE", seconds: float = 0.0) -> None:
        super().__init__(message, log_tail, summary)
        self.limit = limit
        self.seconds = seconds


def outcome(error: Exception) -> str:
    """How a build ended, for metrics: ``not_found``, ``timed_out``, ``source``,
    ``platform``, ``builders`` or ``failed``."""
    if isinstance(error, PackagesNotFound):
        return "not_found"
    if isinstance(error, NixTimedOut):
        return "timed_out"
    if isinstance(error, SourceUnavailable):
        return "source"
    if isinstance(error, PlatformUnavailable):
        return "platform"
    if isinstance(error, BuildersUnavailable):
        return "builders"
    return "failed"


def tail_text(lines: Sequence[str], count: int = MESSAGE_LINES) -> str:
    """The last ``count`` lines, at most ``MAX_MESSAGE`` characters (the end is kept)."""
    text = "\n".join(lines[-count:])
    if len(text) > MAX_MESSAGE:
        text = "[...]" + text[-MAX_MESSAGE:]
    return text


def nix_reason(tail: Sequence[str]) -> str:
    """Nix's message for an attribute that throws: the error lines, without the hint."""
    lines = [line for line in tail if not line.startswith(SHOW_TRACE_HINT)
             and not NOT_FOUND_MARKER.search(line)]
    return tail_text(lines)


def error_line(tail: Sequence[str]) -> str:
    """The line of Nix's output that says what went wrong: git's own complaint where
    git failed (Nix only says that git exited), else Nix's last ``error:`` line, else
    the last line."""
    git_failed = any("program 'git'" in line for line in tail)
    for prefix in ("fatal: ", "error: ") if git_failed else ("error: ",):
        found = [line for line in tail if line.startswith(prefix)]
        if found:
            return found[-1].removeprefix(prefix).strip()
    meaningful = [line for line in tail if line.strip() and not line.startswith(SHOW_TRACE_HINT)]
    return meaningful[-1].strip() if meaningful else "Nix gave no reason"


def describe_source(source: Mapping[str, str]) -> str:
    """The package set Nix was handed, as a person would name it, with its setting."""
    kind = source.get("type")
    if kind == "channel":
        name = f"nixpkgs commit {source['rev']}" if "rev" in source else f"nixpkgs channel {source.get('channel')}"
        if "url" in source:
            return f"{name} from {public_url(source['url'])} (NIXERY_CHANNEL, NIXERY_CHANNEL_URL)"
        return f"{name} (NIXERY_CHANNEL)"
    if kind == "git":
        at = source.get("rev") or source.get("ref") or "HEAD"
        return f"git repository {public_url(source.get('url', '?'))} at {at} (NIXERY_PKGS_REPO)"
    if kind == "path":
        return f"local package set {source.get('path', '?')} (NIXERY_PKGS_PATH)"
    if kind == "flake":
        return f"flake {public_url(source.get('ref', '?'))} (NIXERY_PKGS_FLAKE)"
    return "package set"


SUMMARY_LINE = 240
"""Most characters of a log line quoted in a summary."""


def _clipped(line: str) -> str:
    return line if len(line) <= SUMMARY_LINE else line[:SUMMARY_LINE] + " [...]"


def derivation_name(drv: str) -> str:
    """``/nix/store/<hash>-broken-1.0.drv`` -> ``broken-1.0``."""
    base = drv.rsplit("/", 1)[-1].removesuffix(".drv")
    return base.split("-", 1)[1] if "-" in base else base


def build_failure(tail: Sequence[str], *, source: Mapping[str, str], timeout: float,
                  not_found: Sequence[str] | None, source_loaded: bool) -> NixError:
    """The error a failed ``nix-build`` of an image stands for, read from the end of its
    output: names not found, a package set that could not be loaded, a platform no
    builder serves, a derivation past ``NIX_TIMEOUT``, or a builder that failed."""
    log = tail_text(tail)
    if not_found:
        names = ", ".join(not_found)
        reason = nix_reason(tail)
        if reason:
            said = error_line([line for line in tail if not NOT_FOUND_MARKER.search(line)])
            return PackagesNotFound(f"{said}\n(not found or refused: {names})", log, not_found, reason)
        return PackagesNotFound("packages not found: " + names, log, not_found)
    if not source_loaded:
        what = describe_source(source)
        said = error_line(tail)
        return SourceUnavailable(
            f"cannot load the package set, {what}: {said}; the package set is chosen with {SOURCE_SETTINGS}",
            log)
    # Only Nix's own closing errors say what happened: a builder's log, printed before
    # them, may say anything (a hostile one would pass its failure off as a time-out).
    start = len(tail)
    while start > 0 and NIX_CLOSING.match(tail[start - 1]):
        start -= 1
    for index in range(len(tail) - 1, start - 1, -1):
        line = tail[index]
        if QUOTED_LOG.match(line):
            continue  # the builder's words, quoted by Nix
        platform = WRONG_PLATFORM.search(line)
        if platform:
            wanted, drv, here = platform.groups()
            return PlatformUnavailable(
                f"no builder for {wanted}: {derivation_name(drv)} must be built on {wanted} and this "
                f"host builds {here}; add a {wanted} machine to Nix's builders (NIX_CONFIG) or leave "
                f"{wanted} out of NIXERY_PLATFORMS", log, wanted, here)
        timed_out = DERIVATION_TIMED_OUT.search(line)
        if timed_out:
            what = derivation_name(timed_out.group(1)) if timed_out.group(1) else "a package"
            summary = (f"building {what} took longer than NIX_TIMEOUT ({timeout:g} seconds) "
                       "and was stopped")
            return NixTimedOut(summary + "\n" + log, log, summary, "NIX_TIMEOUT", timeout)
        failed = FAILED_BUILDER.search(line)
        if failed:
            drv, code = failed.groups()
            logged = [line.strip() for line in tail[:index] if line.strip() and not NIX_CHATTER.match(line)]
            # Where Nix did not show the log as it ran, it quotes its end below the error.
            logged = logged or [m.group(1) for line in tail[index + 1:] if (m := QUOTED_LOG.match(line))]
            last = _clipped(logged[-1]) if logged else f"its builder exited with code {code or '?'}"
            summary = f"cannot build {derivation_name(drv)}: {last}"
            message = f"{summary}\nlog of {drv}:\n" + tail_text(logged)
            return NixBuildFailed(message, log, summary, drv)
    if any(NO_BUILD_STARTED in line for line in tail[start:]):
        unreachable = [m.groups() for line in tail if (m := CANNOT_BUILD_ON.match(line))]
        if unreachable:
            machines = "; ".join(f"{uri}: {_clipped(reason)}" for uri, reason in unreachable)
            summary = (f"no build machine could take the build ({machines}); this host builds nothing itself "
                       "(max-jobs = 0): check the machines of Nix's builders (NIX_CONFIG) answer")
            return BuildersUnavailable(summary + "\n" + log, log, summary)
    summary = "Nix failed to build the image: " + error_line(tail)
    return NixBuildFailed(summary + "\n" + log, log, summary)


def failure_record(error: NixError) -> dict[str, Any]:
    """A Nix failure as other instances can raise it again."""
    kind = "failed"
    doc: dict[str, Any] = {"message": error.message, "log_tail": error.log_tail[-4096:], "summary": error.summary}
    if isinstance(error, PackagesNotFound):
        kind = "not-found"
        doc.update(packages=list(error.packages), reason=error.reason)
    elif isinstance(error, NixTimedOut):
        kind = "timed-out"
        doc.update(limit=error.limit, seconds=error.seconds)
    elif isinstance(error, SourceUnavailable):
        kind = "source"
    elif isinstance(error, BuildersUnavailable):
        kind = "builders"
    elif isinstance(error, PlatformUnavailable):
        kind = "platform"
        doc.update(wanted=error.wanted, here=error.here)
    elif isinstance(error, NixBuildFailed):
        doc.update(derivation=error.derivation)
    doc["kind"] = kind
    return doc


def failure_error(doc: dict[str, Any]) -> NixError:
    """The error ``failure_record`` describes."""
    message = str(doc.get("message") or "the build failed on another instance")
    tail = str(doc.get("log_tail") or "")
    summary = str(doc["summary"]) if doc.get("summary") else None
    kind = doc.get("kind")
    if kind == "not-found":
        packages = [str(p) for p in doc.get("packages") or []]
        return PackagesNotFound(message, tail, packages, str(doc.get("reason") or ""))
    if kind == "timed-out":
        seconds = doc.get("seconds")
        return NixTimedOut(message, tail, summary, str(doc.get("limit") or "NIXERY_BUILD_DEADLINE"),
                           float(seconds) if isinstance(seconds, (int, float)) else 0.0)
    if kind == "source":
        return SourceUnavailable(message, tail, summary)
    if kind == "builders":
        return BuildersUnavailable(message, tail, summary)
    if kind == "platform":
        return PlatformUnavailable(message, tail, str(doc.get("wanted") or "?"), str(doc.get("here") or "?"))
    derivation = doc.get("derivation")
    return NixBuildFailed(message, tail, summary, str(derivation) if derivation else None)
