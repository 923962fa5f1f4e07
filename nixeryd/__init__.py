"""nixeryd: a container registry that builds images on demand with Nix."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("nixeryd")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "unknown"
