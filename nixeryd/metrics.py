"""Prometheus metrics of one nixeryd instance, in a registry of its own."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BUILD_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """Counters and gauges the builder, the caches and the API report into."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.builds = Counter(
            "nixeryd_builds", "Image builds, by outcome.", ["outcome"], registry=r
        )
        self.build_seconds = Histogram(
            "nixeryd_build_seconds", "Time to build an image, Nix and packing included.",
            buckets=BUILD_BUCKETS, registry=r,
        )
        self.cache = Counter(
            "nixeryd_manifest_cache", "Manifest lookups, by where the answer came from.",
            ["result"], registry=r,
        )
        self.packed_bytes = Counter(
            "nixeryd_packed_bytes", "Compressed bytes of layers packed.", registry=r
        )
        self.served_bytes = Counter(
            "nixeryd_served_bytes", "Bytes of manifests and blobs served from this instance.",
            registry=r,
        )
        self._running = Gauge("nixeryd_nix_builds_running", "Nix builds running now.", registry=r)
        self._queued = Gauge("nixeryd_build_queue_length", "Builds waiting for a slot.", registry=r)

    def watch(self, running: Callable[[], float], queued: Callable[[], float]) -> None:
        """Read the running and queued build counts when scraped."""
        self._running.set_function(running)
        self._queued.set_function(queued)
