"""Prometheus metrics of one sidecar app, in a registry of its own (no process globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import Enum as EnumMetric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from unlockd.models import UnlockState

__all__ = ["Metrics"]


class Metrics:
    """The sidecar's counters; one instance per app, created in the lifespan."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "unlockd_http_requests",
            "HTTP requests served",
            ["method", "route", "status"],
            registry=r,
        )
        self.plaintext_bytes_sent = Counter(
            "unlockd_plaintext_bytes_sent", "Decrypted bytes streamed to local clients", registry=r
        )
        self.upload_bytes_received = Counter(
            "unlockd_upload_bytes_received", "Plaintext bytes received in uploads", registry=r
        )
        self.cache_hits = Counter(
            "unlockd_cache_hits", "Big parts served from the cache", registry=r
        )
        self.cache_misses = Counter(
            "unlockd_cache_misses", "Big parts fetched from the CDN", registry=r
        )
        self.upstream_errors = Counter(
            "unlockd_upstream_errors", "Failed upstream or CDN calls", ["kind"], registry=r
        )
        self.integrity_failures = Counter(
            "unlockd_integrity_failures",
            "Downloads aborted because a segment failed authentication",
            registry=r,
        )
        self.offline_loads = Counter(
            "unlockd_offline_loads",
            "Loads served from the cache with remembered metadata, the upstream being away",
            registry=r,
        )
        self.active_transfers = Gauge(
            "unlockd_active_transfers", "Downloads and uploads in progress", registry=r
        )
        self.unlock_state = EnumMetric(
            "unlockd_unlock_state",
            "State of the unlock workflow",
            states=[s.value for s in UnlockState],
            registry=r,
        )
        self.unlock_state.state(UnlockState.IDLE.value)

    def upstream_error(self, kind: str) -> None:
        """Count one failed upstream or CDN call of ``kind`` (login, resource, blob, ...)."""
        self.upstream_errors.labels(kind=kind).inc()

    def render(self) -> tuple[bytes, str]:
        """Return the exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
