"""The reference upstream: accounts, resources, keys, uploads and the blob origin (SPEC §5)."""

from __future__ import annotations

from unlockd.hub.accounts import add_user
from unlockd.hub.app import create_hub_app
from unlockd.hub.config import HubSettings

__all__ = ["HubSettings", "add_user", "create_hub_app"]
