"""moto's server mode from PyPI, started for real on loopback as the tests' S3 service.

moto stands for S3 here the way gcp-storage-emulator stands for GCS: its answers
are S3's (conditional writes, ETags, presigned URLs, error codes). Where it is
laxer than S3 (it does not check Content-MD5), the backend's own checks are what
the tests see.
"""
from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.daemon import ServerProcess, free_port
from tests.processes import keep_for_session

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


@dataclass(kw_only=True)
class Moto(ServerProcess):
    """moto's server; ``environ`` INITIAL_NO_AUTH_ACTION_COUNT=0 makes it check every
    request's credentials, as S3 does (it takes any by default)."""

    marker: str = READY
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int | None = None) -> Moto:
        self.port = port or free_port()
        self.spawn([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)])
        return self

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
