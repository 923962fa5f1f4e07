"""gcp-storage-emulator from PyPI, started for real on loopback for the tests."""
from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.daemon import ServerProcess, free_port
from tests.gcs_preconditions import PreconditionProxy
from tests.processes import keep_for_session

EMULATOR = Path(sys.executable).parent / "gcp-storage-emulator"


@dataclass(kw_only=True)
class Emulator(ServerProcess):
    marker: str = "All services started"
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> Emulator:
        self.port = port or free_port()
        self.spawn([str(EMULATOR), "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory"])
        return self

    def new_bucket(self) -> str:
        """A fresh, empty bucket: every test gets its own."""
        name = "nixeryd-" + secrets.token_hex(6)
        self.client().create_bucket(name)
        return name

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": self.url}
        )


_shared: Emulator | None = None


def shared_emulator() -> Emulator:
    """One emulator for the whole test run, started at first use."""
    global _shared
    if _shared is None:
        _shared = Emulator().start()
        keep_for_session(_shared)
    return _shared


_guarded: PreconditionProxy | None = None


def guarded_emulator() -> PreconditionProxy:
    """The shared emulator behind a proxy that enforces GCS's generation preconditions
    (see ``tests.gcs_preconditions``): for tests of what only those preconditions keep
    right, such as build leases."""
    global _guarded
    if _guarded is None:
        _guarded = PreconditionProxy(shared_emulator().port)
    return _guarded
