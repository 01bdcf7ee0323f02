"""Settings of the hub, validated once from flags and ``UNLOCKD_HUB_*`` variables."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlockd.config import (
    Config,
    Setting,
    at_least,
    path,
    port_number,
    read_settings,
    text,
    validate_settings,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["HubSettings", "default_data_dir", "resolve_data_dir"]


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return ``$XDG_DATA_HOME/unlockd/hub`` (``~/.local/share/unlockd/hub`` without it)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_DATA_HOME") or str(Path("~/.local/share").expanduser())
    return Path(base) / "unlockd" / "hub"


@dataclasses.dataclass(frozen=True, slots=True)
class HubSettings:
    """Where the hub keeps its data, where it listens and how long tokens and uploads live."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8700
    token_ttl: int = 3600
    upload_ttl: int = 3600

    def __post_init__(self) -> None:
        validate_settings(self, _HUB)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> HubSettings:
        """Build settings from ``UNLOCKD_HUB_*`` variables; non-None ``overrides`` win.

        Raises :class:`~unlockd.errors.InvalidInputError` naming the variable or flag of a
        bad value.
        """
        values = read_settings(environ, _HUB, overrides)
        values.setdefault("data_dir", default_data_dir(environ))
        return cls(**values)


def resolve_data_dir(environ: Mapping[str, str], override: object = None) -> Path:
    """The data dir: ``override`` (a flag) if given, else ``UNLOCKD_HUB_DATA_DIR``, else default."""
    config = Config(environ, {"--data-dir": override})
    setting = _HUB["data_dir"]
    data_dir: Path | None = config(setting.variable, setting.cast, None, flag=setting.flag)
    return default_data_dir(environ) if data_dir is None else data_dir


_HUB = {
    "data_dir": Setting("UNLOCKD_HUB_DATA_DIR", path, "--data-dir"),
    "host": Setting("UNLOCKD_HUB_HOST", text),
    "port": Setting("UNLOCKD_HUB_PORT", port_number),
    "token_ttl": Setting("UNLOCKD_HUB_TOKEN_TTL", at_least(1)),
    "upload_ttl": Setting("UNLOCKD_HUB_UPLOAD_TTL", at_least(1)),
}
