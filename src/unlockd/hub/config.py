"""Settings of the hub, validated once from flags and ``UNLOCKD_HUB_*`` variables."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlockd.config import integer
from unlockd.errors import InvalidInputError

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
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        # Built in code, so the error names the field; from_environ names the flag or variable.
        for name, (_, _, minimum, maximum) in _INTEGERS.items():
            integer(name, getattr(self, name), minimum, maximum)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> HubSettings:
        """Build settings from ``UNLOCKD_HUB_*`` variables; non-None ``overrides`` win."""
        fields = {field.name for field in dataclasses.fields(cls)}
        if unknown := sorted(set(overrides) - fields):
            msg = f"unknown hub setting {unknown[0]!r}"
            raise InvalidInputError(msg)
        values: dict[str, Any] = {
            "data_dir": resolve_data_dir(environ, overrides.get("data_dir")),
        }
        if raw := environ.get("UNLOCKD_HUB_HOST"):
            values["host"] = raw
        if overrides.get("host") is not None:
            values["host"] = overrides["host"]
        for name, (variable, flag, minimum, maximum) in _INTEGERS.items():
            if (override := overrides.get(name)) is not None:
                values[name] = integer(flag, override, minimum, maximum)
            elif raw := environ.get(variable):
                values[name] = integer(variable, raw, minimum, maximum)
        return cls(**values)


def resolve_data_dir(environ: Mapping[str, str], override: object = None) -> Path:
    """The data dir: ``override`` (a flag) if given, else ``UNLOCKD_HUB_DATA_DIR``, else default."""
    if override is not None:
        return Path(str(override)).expanduser()
    if raw := environ.get("UNLOCKD_HUB_DATA_DIR"):
        return Path(raw).expanduser()
    return default_data_dir(environ)


# Each integer field, by name: its variable, its flag, and its bounds.
_INTEGERS: dict[str, tuple[str, str, int, int | None]] = {
    "port": ("UNLOCKD_HUB_PORT", "--port", 0, 65535),
    "token_ttl": ("UNLOCKD_HUB_TOKEN_TTL", "--token-ttl", 1, None),
    "upload_ttl": ("UNLOCKD_HUB_UPLOAD_TTL", "--upload-ttl", 1, None),
}
