"""The ``nixeryd`` command.

  nixeryd serve [twistd options for nixeryd]   run the registry in the foreground
  nixeryd build NAME[:TAG]                      build and store an image, no HTTP
  nixeryd gc --keep-days N                      remove blobs no kept image needs
  nixeryd verify [--repair]                     re-hash every blob, check every record
  nixeryd popularity [-o FILE]                  write popularity data for layering

Settings come from the environment, as for the daemon.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Sequence, TextIO

from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogEvent, globalLogBeginner
from zope.interface import implementer

if TYPE_CHECKING:
    from nixeryd.config import Config
    from nixeryd.parts import Parts, Reactor


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if args[:1] == ["serve"]:
        _serve(args[1:])
        return
    options = parser.parse_args(args)
    if options.command == "settings":
        from nixeryd.settings import reference

        sys.stdout.write(reference())
        return
    try:
        from nixeryd.config import Config, ConfigError

        config = Config.from_env(dict(os.environ), cwd=os.getcwd(), cpu_count=os.cpu_count() or 1)
    except ConfigError as e:
        sys.exit(f"nixeryd: {e}")
    if options.command == "build":
        from nixeryd.parts import load_popularity_setting

        try:
            popularity = load_popularity_setting(config)
        except ConfigError as e:
            sys.exit(f"nixeryd: {e}")
        _react(_build, config, options.image, popularity)
    elif options.command == "gc":
        _react(_gc, config, options.keep_days, options.dry_run)
    elif options.command == "verify":
        _react(_verify, config, options.repair)
    elif options.command == "popularity":
        _react(_popularity, config, options.output)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nixeryd",
        description="A container registry that builds images on demand with Nix. "
        "Settings come from the environment (`nixeryd settings` lists them; the book, under /docs/ of "
        "any instance, says more).",
    )
    from nixeryd import __version__

    parser.add_argument("--version", action="version", version=f"nixeryd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("serve", help="run the registry in the foreground (takes twistd nixeryd's options)")
    build = sub.add_parser("build", help="build and store an image without HTTP, e.g. to warm a fleet")
    build.add_argument("image", metavar="NAME[:TAG]", help="image name, as pulled (tag: latest)")
    gc = sub.add_parser("gc", help="remove blobs that no kept image needs; safe while serving")
    gc.add_argument("--keep-days", type=float, required=True, metavar="N",
                    help="keep every image built or served in the last N days, and every blob "
                    "written in them")
    gc.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    verify = sub.add_parser("verify", help="re-hash every stored blob and check every record; "
                            "exits 1 when something is damaged")
    verify.add_argument("--repair", action="store_true",
                        help="remove what is damaged, so that the next pull rebuilds it")
    sub.add_parser("settings", help="print every setting, its option, default and meaning (a Markdown table)")
    popularity = sub.add_parser("popularity", help="write popularity data from the package set")
    popularity.add_argument("-o", "--output", default="-", metavar="FILE",
                            help="where to write the JSON (default: standard output)")
    return parser


def _serve(args: list[str]) -> None:
    from twisted.scripts.twistd import run

    if args[:1] in (["-h"], ["--help"]):
        args = ["--help"]
    sys.argv = ["nixeryd serve", "--nodaemon", "--pidfile=", "nixeryd", *args]
    run()


def _react(command: Callable[..., Awaitable[None]], *args: Any) -> None:
    from twisted.internet import task

    task.react(lambda reactor: Deferred.fromCoroutine(_guarded(command, reactor, *args)))


async def _guarded(command: Callable[..., Awaitable[None]], reactor: Reactor, *args: Any) -> None:
    from nixeryd.config import ConfigError

    globalLogBeginner.beginLoggingTo([Progress(sys.stderr)], redirectStandardIO=False)
    try:
        await command(reactor, *args)
    except (ConfigError, CommandError) as e:
        sys.stderr.write(f"nixeryd: {e}\n")
        raise SystemExit(1) from None


class CommandError(Exception):
    """A command that cannot do what it was asked; one line for the operator."""


@implementer(ILogObserver)
class Progress:
    """Shows a command's progress: Nix's output, layers as they are packed, warnings."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.layers = 0

    def __call__(self, event: LogEvent) -> None:
        from twisted.logger import LogLevel, formatEvent

        fmt = event.get("log_format") or ""
        if event.get("build_log"):
            line = f"  nix  {event.get('line', '')}"
        elif fmt.startswith("packed layer"):
            self.layers += 1
            line = f"  layer {self.layers}: {event.get('size', 0):,} bytes {event.get('digest', '')}"
        elif fmt.startswith(("building ", "built ", "removed", "would remove", "kept", "damaged")) or (
            event.get("log_level") in (LogLevel.warn, LogLevel.error, LogLevel.critical)
        ):
            line = formatEvent(event)
        else:
            return
        if getattr(self._out, "isatty", lambda: False)():
            line = "\r\x1b[K" + line  # over a progress bar, if one is drawn
        self._out.write(line + "\n")
        self._out.flush()


def _parts(config: Config, reactor: Reactor, popularity: Mapping[str, int] | None = None) -> Parts:
    from nixeryd.parts import build_parts

    parts = build_parts(config, reactor, popularity or {})
    parts.top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", parts.top.stopService)
    return parts


async def _build(reactor: Reactor, config: Config, image_ref: str, popularity: Mapping[str, int] | None) -> None:
    from nixeryd.http.errors import as_registry_errors
    from nixeryd.image.names import NameInvalid, TagInvalid, parse_name, parse_reference

    name, tag = image_ref, "latest"
    if ":" in image_ref:
        name, tag = image_ref.rsplit(":", 1)
    try:
        image = parse_name(name, config.base_packages)
        reference = parse_reference(tag)
    except (NameInvalid, TagInvalid) as e:
        raise CommandError(f"{image_ref}: {e}") from None
    if not hasattr(reference, "value"):
        raise CommandError(f"{image_ref}: build takes a tag, not a digest")
    parts = _parts(config, reactor, popularity)
    from nixeryd.http.errors import RegistryError

    try:
        manifests = await as_registry_errors(image.name, parts.images.manifests(image, tag))
    except RegistryError as e:
        raise CommandError(f"{image_ref}: {e.message}") from None
    docker = manifests.docker.digest if manifests.docker is not None else None  # none with zstd
    print(json.dumps({"image": f"{name}:{tag}", "digest": manifests.oci.digest, "docker_digest": docker}))


async def _gc(reactor: Reactor, config: Config, keep_days: float, dry_run: bool) -> None:
    from nixeryd.registry.gc import collect

    if keep_days < 0.1:
        # Instances serve manifests from memory for up to an hour between checks.
        raise CommandError("--keep-days: must be at least 0.1 (2.4 hours)")
    parts = _parts(config, reactor)
    report = await collect(parts.storage, keep_seconds=keep_days * 86400,
                           now=reactor.seconds(), dry_run=dry_run)
    print(json.dumps(report.summary()))


async def _verify(reactor: Reactor, config: Config, repair: bool) -> None:
    from nixeryd.registry.verify import verify

    parts = _parts(config, reactor)
    bar = ProgressBar(sys.stderr)
    report = await verify(parts.storage, repair=repair, progress=bar)
    bar.close()
    print(json.dumps(report.summary()))
    if report.damaged and not repair:
        raise SystemExit(1)


class ProgressBar:
    """A one-line progress bar, redrawn in place, on a terminal only."""

    WIDTH = 30

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._shown = False
        self._on_terminal = bool(getattr(out, "isatty", lambda: False)())

    def __call__(self, what: str, done: int, total: int) -> None:
        if not self._on_terminal:
            return
        filled = self.WIDTH * done // total if total else self.WIDTH
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        self._out.write(f"\r{what:<8} [{bar}] {done}/{total}\x1b[K")
        self._out.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self._out.write("\n")
            self._out.flush()
            self._shown = False


async def _popularity(reactor: Reactor, config: Config, output: str) -> None:
    from nixeryd.build.popularity import compute_popularity
    from nixeryd.parts import default_nix_dir, nix_conf_dir

    table = await compute_popularity(
        reactor, config.nix_dir or default_nix_dir(), config.source.nix_source("latest"),
        config.child_environment, conf_dir=nix_conf_dir(config.child_environment),
    )
    data = json.dumps(table, sort_keys=True, indent=1) + "\n"
    if output == "-":
        sys.stdout.write(data)
    else:
        with open(output, "w") as f:
            f.write(data)
    sys.stderr.write(f"popularity of {len(table)} packages written\n")


if __name__ == "__main__":
    main()
