"""``twistd nixeryd``: its options (the settings, read and checked in ``postOptions``) and
the service they wire. The only module, with ``cli.py``, that touches the global reactor
and the process environment."""
from __future__ import annotations

import os
import sys
from typing import NoReturn

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.python import usage

from nixeryd import __version__
from nixeryd.config import Config, ConfigError
from nixeryd.http.book import book, book_directory
from nixeryd.http.connection import PlainHTTPFactory, make_site
from nixeryd.http.imagepage import ImagePages
from nixeryd.http.index import Status
from nixeryd.http.registry import RegistryAPI
from nixeryd.parts import (
    Reactor,
    build_parts,
    check_files,
    load_popularity_setting,
    make_authenticator,
    make_signatures,
)
from nixeryd.services import Announce, Listeners, describe_storage

log = Logger()


class Options(usage.Options):
    """Command-line options; each overrides the environment variable it names."""

    optParameters = [
        ["channel", None, None, "nixpkgs channel or commit (NIXERY_CHANNEL)."],
        ["pkgs-repo", None, None, "git repository of the package set (NIXERY_PKGS_REPO)."],
        ["pkgs-path", None, None, "local path of the package set (NIXERY_PKGS_PATH)."],
        ["pkgs-flake", None, None, "flake reference of the package set (NIXERY_PKGS_FLAKE)."],
        ["storage-path", None, None, "where the filesystem backend stores blobs (STORAGE_PATH)."],
        ["nix-timeout", None, None, "seconds a Nix build may take (NIX_TIMEOUT)."],
        ["popularity", None, None, "popularity data, a URL or a file (NIX_POPULARITY_URL)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_version(self) -> None:
        """Print nixeryd's version and exit."""
        sys.stdout.write(f"nixeryd {__version__}\n")
        raise SystemExit(0)

    def opt_listen(self, description: str) -> None:
        """Listen on a Twisted endpoint, e.g. tcp:8080 (repeatable; default from PORT)."""
        self["listen"].append(description)

    def postOptions(self) -> None:
        """Settings are read and checked here, before anything is wired (``makeService``
        only wires): a bad one ends start-up with one line naming it. Not as a
        ``UsageError``, which twistd prints after its whole help: a setting in the
        environment is not a matter of the command's usage."""
        try:
            self.settings = self.config(dict(os.environ), os.getcwd())
            check_files(self.settings)
        except ConfigError as e:
            refuse(e)

    def config(self, environ: dict[str, str], cwd: str) -> Config:
        """The environment's settings with these options applied."""
        env = dict(environ)
        for option, variable in [
            ("channel", "NIXERY_CHANNEL"),
            ("pkgs-repo", "NIXERY_PKGS_REPO"),
            ("pkgs-path", "NIXERY_PKGS_PATH"),
            ("pkgs-flake", "NIXERY_PKGS_FLAKE"),
            ("storage-path", "STORAGE_PATH"),
            ("nix-timeout", "NIX_TIMEOUT"),
            ("popularity", "NIX_POPULARITY_URL"),
        ]:
            if self[option] is not None:
                env[variable] = self[option]
        config = Config.from_env(env, cwd=cwd, cpu_count=os.cpu_count() or 1)
        if self["listen"]:
            config = config.with_overrides(listen=tuple(self["listen"]))
        return config


def build_service(config: Config, reactor: Reactor) -> MultiService:
    """Every part of a running nixeryd, wired from ``config``."""
    parts = build_parts(config, reactor, load_popularity_setting(config))
    builder = parts.builder
    status = Status(
        source=config.source.describe(),
        active=lambda: builder.activity.active,
        failures=lambda: list(builder.activity.failures),
        tail=parts.logs.tail,
        now=reactor.seconds,
        storage=describe_storage(config),
        listen=", ".join(config.listen),
        catalogue=parts.images.catalogue,
    )
    signatures = make_signatures(config, parts.builder, parts.images)
    api = RegistryAPI(
        parts.images, parts.storage, config.base_packages, metrics=parts.metrics, status=status,
        auth=make_authenticator(config, parts.auth_offload, reactor),
        signatures=signatures,
        pages=ImagePages(parts.images, parts.storage, parts.offload, signing=signatures is not None),
        book=book(book_directory()),
    )
    site = make_site(api.resource(), parts.metrics, access_log=config.access_log)
    Announce(config).setServiceParent(parts.top)
    listeners = Listeners()
    listeners.setServiceParent(parts.top)
    for description in config.listen:
        try:
            # strports' service fails start-up when it cannot listen, rather than
            # logging the error and running on deaf.
            service = strports.service(description, PlainHTTPFactory(site), reactor=reactor)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--listen: bad endpoint {description!r}: {e}") from None
        service.setServiceParent(listeners)
    return parts.top


def refuse(error: ConfigError) -> NoReturn:
    """End start-up with one line: twistd has no other way to refuse it without a traceback."""
    sys.stderr.write(f"nixeryd: {error}\n")
    raise SystemExit(1)


def makeService(options: Options, reactor: Reactor | None = None) -> IService:
    """twistd's entry point: wires the settings ``postOptions`` checked. What only start-up
    can find (a bucket out of reach, popularity data that does not load, an endpoint that
    is not one) ends it with one line too."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    try:
        return build_service(options.settings, reactor)
    except ConfigError as e:
        refuse(e)
