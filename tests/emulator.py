"""gcp-storage-emulator from PyPI, started for real on loopback for the tests."""
from __future__ import annotations

import secrets
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.daemon import came_up, drain, free_port, terminate
from tests.gcs_preconditions import PreconditionProxy
from tests.processes import die_with_parent, keep_for_session, register, unregister

EMULATOR = Path(sys.executable).parent / "gcp-storage-emulator"


@dataclass
class Emulator:
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    output: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> Emulator:
        self.port = port or free_port()
        self.ready.clear()
        self.process = subprocess.Popen(
            [str(EMULATOR), "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),
        )
        register(self)
        drain(self.process, self.output, self.ready, "All services started")
        if not came_up(self.ready, self.output, "All services started", 60):
            self.stop()
            raise AssertionError("the storage emulator did not start:\n" + "".join(self.output))
        return self

    def stop(self) -> None:
        unregister(self)
        if self.process is not None:
            terminate(self.process)
        self.process = None

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
