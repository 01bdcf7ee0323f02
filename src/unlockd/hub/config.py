"""Settings of the hub, validated once from flags and ``UNLOCKD_HUB_*`` variables."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlockd.errors import InvalidInputError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["HubSettings", "default_data_dir"]


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Return ``$XDG_DATA_HOME/unlockd/hub`` (``~/.local/share/unlockd/hub`` without it)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_DATA_HOME") or str(Path("~/.local/share").expanduser())
    return Path(base) / "unlockd" / "hub"


def _int(key: str, raw: object, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(str(raw))
    except (TypeError, ValueError):
        msg = f"{key}: expected an integer, got {raw!r}"
        raise InvalidInputError(msg) from None
    if value < minimum or (maximum is not None and value > maximum):
        upper = "" if maximum is None else f" and at most {maximum}"
        msg = f"{key}: must be at least {minimum}{upper}, got {value}"
        raise InvalidInputError(msg)
    return value


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
        _int("port", self.port, 0, 65535)
        _int("token_ttl", self.token_ttl, 1)
        _int("upload_ttl", self.upload_ttl, 1)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides: Any) -> HubSettings:
        """Build settings from ``UNLOCKD_HUB_*`` variables; non-None ``overrides`` win."""
        values: dict[str, Any] = {}
        if raw := environ.get("UNLOCKD_HUB_DATA_DIR"):
            values["data_dir"] = Path(raw)
        if raw := environ.get("UNLOCKD_HUB_HOST"):
            values["host"] = raw
        if raw := environ.get("UNLOCKD_HUB_PORT"):
            values["port"] = _int("UNLOCKD_HUB_PORT", raw, 0, 65535)
        if raw := environ.get("UNLOCKD_HUB_TOKEN_TTL"):
            values["token_ttl"] = _int("UNLOCKD_HUB_TOKEN_TTL", raw, 1)
        if raw := environ.get("UNLOCKD_HUB_UPLOAD_TTL"):
            values["upload_ttl"] = _int("UNLOCKD_HUB_UPLOAD_TTL", raw, 1)
        fields = {field.name for field in dataclasses.fields(cls)}
        for name, value in overrides.items():
            if name not in fields:
                msg = f"unknown hub setting {name!r}"
                raise InvalidInputError(msg)
            if value is not None:
                values[name] = Path(value) if name == "data_dir" else value
        values.setdefault("data_dir", default_data_dir(environ))
        return cls(**values)
