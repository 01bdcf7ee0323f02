"""A tiny ``docker save`` archive, written in Python: the dev stack's demo image, and tests'."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DEMO_IMAGE", "IMAGE_LABEL", "build_image_archive", "demo_image_archive"]

DEMO_IMAGE = "unlockd-demo:latest"
# Every image built here carries its tag in this label, so an untagged leftover can be found.
IMAGE_LABEL = "io.unlockd.image"


def build_image_archive(images: Mapping[str, Mapping[str, bytes]]) -> bytes:
    """Return a ``docker save`` archive of ``{tag: {path: content}}``, one layer per image.

    Images are small by nature here (a demo, test fixtures), so the archive is built in memory.
    """
    out = io.BytesIO()
    manifest = []
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for tag, files in images.items():
            layer_buf = io.BytesIO()
            with tarfile.open(fileobj=layer_buf, mode="w", format=tarfile.USTAR_FORMAT) as layer:
                for path, content in files.items():
                    _add(layer, path, content)
            layer_bytes = layer_buf.getvalue()
            diff_id = hashlib.sha256(layer_bytes).hexdigest()
            config = json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "config": {"Labels": {IMAGE_LABEL: tag}},
                    "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
                    "history": [{"created_by": "unlockd"}],
                }
            ).encode()
            config_id = hashlib.sha256(config).hexdigest()
            _add(archive, f"{diff_id}/layer.tar", layer_bytes)
            _add(archive, f"{config_id}.json", config)
            manifest.append(
                {
                    "Config": f"{config_id}.json",
                    "RepoTags": [tag],
                    "Layers": [f"{diff_id}/layer.tar"],
                }
            )
        _add(archive, "manifest.json", json.dumps(manifest).encode())
    return out.getvalue()


def demo_image_archive(tag: str = DEMO_IMAGE) -> bytes:
    """The dev stack's demo image, tagged ``tag``: one file, ``/hello.txt``."""
    return build_image_archive({tag: {"hello.txt": b"unlocked by unlockd\n"}})


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))
