"""moto's server mode from PyPI, started for real on loopback as the tests' S3 service.

moto stands for S3 here the way gcp-storage-emulator stands for GCS: its answers
are S3's (conditional writes, ETags, presigned URLs, error codes). Where it is
laxer than S3 (it does not check Content-MD5), the backend's own checks are what
the tests see.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.daemon import came_up, drain, free_port, terminate
from tests.processes import die_with_parent, keep_for_session, register, unregister

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
READY = "Running on http://"
REGION = "eu-west-3"
# Credentials moto accepts; nothing from the host's own AWS settings is read.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "nixeryd-test",
    "AWS_SECRET_ACCESS_KEY": "nixeryd-test-secret",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class Moto:
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    output: list[str] = field(default_factory=list)
    # INITIAL_NO_AUTH_ACTION_COUNT=0: check every request's credentials, as S3 does
    # (moto takes any by default).
    environ: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> Moto:
        self.port = port or free_port()
        self.ready.clear()
        self.process = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(), env=dict(os.environ, **self.environ),
        )
        register(self)
        drain(self.process, self.output, self.ready, READY)
        if not came_up(self.ready, self.output, READY, 60):
            self.stop()
            raise AssertionError("moto did not start:\n" + "".join(self.output))
        return self

    def stop(self) -> None:
        unregister(self)
        if self.process is not None:
            terminate(self.process)
        self.process = None

    def environment(self) -> dict[str, str]:
        """What a daemon needs to reach this server through the AWS SDK's standard chain."""
        return dict(CREDENTIALS, AWS_ENDPOINT_URL=self.url, AWS_REGION=REGION)

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self) -> str:
        """A fresh, empty bucket: every test gets its own."""
        name = "nixeryd-" + secrets.token_hex(6)
        self.client().create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": REGION})
        return name


_shared: Moto | None = None


def shared_moto() -> Moto:
    """One moto server for the whole test run, started at first use."""
    global _shared
    if _shared is None:
        _shared = Moto().start()
        keep_for_session(_shared)
    return _shared
