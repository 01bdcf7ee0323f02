"""``unlockd dev``: hub + sidecar on loopback, a demo publisher and a sealed demo image."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from unlockd.app import create_app
from unlockd.config import Config, Settings, port_number, text
from unlockd.demo import DEMO_IMAGE, demo_image_archive
from unlockd.errors import UnlockdError
from unlockd.files import AtomicFile
from unlockd.hub import HubSettings, add_user, create_hub_app
from unlockd.seal import seal
from unlockd.server import configure_logging, prepare_dir, run_servers

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator

__all__ = ["DEMO_EMAIL", "DEV_DIR", "DEV_HUB_PORT", "DEV_SIDECAR_PORT", "dev_command"]

DEMO_EMAIL = "demo@example.com"
DEV_DIR = Path(".unlockd-dev")
DEV_HUB_PORT = 8700
DEV_SIDECAR_PORT = 8600
DEV_ARCHIVE_KEY_ID = "images"
logger = logging.getLogger("unlockd")


def dev_command(args: argparse.Namespace) -> int:
    """Run hub and sidecar on loopback with a demo publisher account; data in ./.unlockd-dev.

    Both use their own fixed settings but for the ports (``--port``, ``--hub-port``) and the
    demo image's tag (``--demo-image``): ``UNLOCKD_*`` variables (meant for ``serve`` and
    ``hub``) would break the printed session, e.g. an API token the banner's curls lack.
    Only ``DOCKER_HOST`` is honoured, for unlocking into the engine.
    """
    flags = Config({}, {"--port": args.port, "--hub-port": args.hub_port})
    sidecar_port = flags("", port_number, DEV_SIDECAR_PORT, flag="--port")
    hub_port = flags("", port_number, DEV_HUB_PORT, flag="--hub-port")
    demo_image = text("--demo-image", args.demo_image or DEMO_IMAGE)
    base = DEV_DIR.resolve()
    hub_dir, cache_dir, archive = base / "hub", base / "cache", base / "images.enc"
    for directory in (hub_dir, cache_dir):
        prepare_dir(directory, "the dev stack's data dir")
    password = _demo_password(base / "demo-password")
    add_user(hub_dir, DEMO_EMAIL, password, role="publisher")
    upstream = f"http://127.0.0.1:{hub_port}"
    hub = create_hub_app(HubSettings(data_dir=hub_dir, host="127.0.0.1", port=hub_port))
    sidecar = create_app(
        Settings.from_environ(
            {k: v for k, v in os.environ.items() if k == "DOCKER_HOST"},
            host="127.0.0.1",
            port=sidecar_port,
            upstream_url=upstream,
            cache_dir=cache_dir,
            archive=archive,
            archive_key_id=DEV_ARCHIVE_KEY_ID,
        )
    )
    configure_logging()

    async def setup() -> None:
        try:
            await _seal_demo_archive(archive, upstream, password, demo_image)
        except UnlockdError as exc:
            logger.warning("could not seal the demo image archive: %s", exc.message)
        sidecar_url = f"http://127.0.0.1:{sidecar_port}"
        print(_dev_banner(base, upstream, sidecar_url, password, demo_image), flush=True)  # noqa: T201

    return run_servers([(hub, "127.0.0.1", hub_port), (sidecar, "127.0.0.1", sidecar_port)], setup)


async def _seal_demo_archive(archive: Path, upstream: str, password: str, image: str) -> None:
    """Seal the demo image into ``archive``, its key registered at the dev hub.

    Sealed anew at every start, so the archive and the hub's key always belong together;
    the plaintext (a few KiB, built in memory) is never written to disk.
    """

    async def plaintext() -> AsyncIterator[bytes]:
        yield demo_image_archive(image)

    await seal(
        plaintext(),
        archive,
        key_id=DEV_ARCHIVE_KEY_ID,
        upstream=upstream,
        email=DEMO_EMAIL,
        password=password,
    )


def _demo_password(path: Path) -> str:
    """The dev account's password: random on first run, then kept in ``path`` (mode 0600)."""
    with contextlib.suppress(FileNotFoundError):
        if stored := path.read_text().strip():
            return stored
    password = secrets.token_urlsafe(12)
    with AtomicFile(path) as temp:
        temp.file.write(password.encode() + b"\n")
    return password


def _dev_banner(base: Path, upstream: str, sidecar: str, password: str, image: str) -> str:
    login = shlex.quote(f'{{"email": "{DEMO_EMAIL}", "password": "{password}"}}')
    lines = [
        "unlockd dev stack",
        f"  hub (upstream)   {upstream}   data in {base / 'hub'}",
        f"  sidecar          {sidecar}   cache in {base / 'cache'}",
        f"  demo publisher   {DEMO_EMAIL} / {password}   (kept in {base / 'demo-password'})",
        "",
        "Try it (another terminal; the session's files go to a scratch directory):",
        '  cd "$(mktemp -d)"',
        f"  curl -s {sidecar}/login -H 'Content-Type: application/json' -d {login}",
        "  head -c 50000000 /dev/urandom > model.bin",
        f"  curl -s -F folder=models -F data=@model.bin {sidecar}/upload/model.bin",
        f"  curl -s -X POST {sidecar}/load/model.bin -o loaded.bin && cmp model.bin loaded.bin",
        f"  curl -s -r 0-9999999 -o resumed.bin {sidecar}/resources/models/model.bin",
        f"  curl -s -C - -o resumed.bin {sidecar}/resources/models/model.bin",
        "  cmp model.bin resumed.bin",
        f"  curl -s {sidecar}/status; curl -s {sidecar}/metrics | grep unlockd_",
        "",
        f"Unlock the demo image archive {base / 'images.enc'} into Docker (DOCKER_HOST):",
        f"  curl -s -X POST {sidecar}/unlock -H 'Content-Type: application/json' -d {login}",
        f"  curl -s {sidecar}/unlock/status   # until state is ready: images [{image}]",
        "",
        "Ctrl-C stops both.",
    ]
    return "\n".join(lines)
