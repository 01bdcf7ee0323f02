"""unlockd: an edge sidecar that streams encrypted models and unlocks encrypted image archives."""

from __future__ import annotations

__version__ = "0.1.0"
