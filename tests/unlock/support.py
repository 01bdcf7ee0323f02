"""Helpers shared by the unlock tests and fixtures: test image archives, engine access."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
import urllib.parse
import uuid

import httpx

PUBLISHER = ("publisher@example.com", "publisher-password")
READER = ("reader@example.com", "reader-password")


def engine_client(docker_host: str) -> httpx.Client:
    """A synchronous client of the engine API at ``docker_host``."""
    if docker_host.startswith("unix://"):
        transport = httpx.HTTPTransport(uds=docker_host.removeprefix("unix://"))
        return httpx.Client(transport=transport, base_url="http://docker", timeout=30)
    base = docker_host.replace("tcp://", "http://", 1)
    return httpx.Client(base_url=base, timeout=30)


class Engine:
    """Synchronous helpers over the engine API for assertions and cleanup."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.prefix = f"unlockd-test-{uuid.uuid4().hex[:12]}"
        self._count = 0

    def new_tag(self) -> str:
        """Return a tag unique to this test; its image is removed at teardown."""
        self._count += 1
        return f"{self.prefix}/img{self._count}:v1"

    def tags(self) -> set[str]:
        """Tags of this test's images present in the engine."""
        response = self.client.get("/images/json")
        response.raise_for_status()
        return {
            tag
            for image in response.json()
            for tag in image.get("RepoTags") or []
            if tag.startswith(self.prefix)
        }

    def leftovers(self) -> int:
        """Images of this test in the engine, tagged or not (found by their label)."""
        response = self.client.get("/images/json", params={"all": "1"})
        response.raise_for_status()
        return sum(
            1
            for image in response.json()
            if str((image.get("Labels") or {}).get("unlockd.test", "")).startswith(self.prefix)
        )

    def load(self, archive: bytes) -> None:
        """Load a plaintext archive directly (the engine's own API, as `docker load` does)."""
        response = self.client.post("/images/load", content=archive)
        response.raise_for_status()

    def remove_all(self) -> None:
        for tag in self.tags():
            quoted = urllib.parse.quote(tag, safe="")
            self.client.delete(f"/images/{quoted}", params={"force": "1"})


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def build_image_archive(images: dict[str, dict[str, bytes]]) -> bytes:
    """A `docker save` archive (one layer per image) of ``{tag: {path: content}}``."""
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
                    "config": {"Labels": {"unlockd.test": tag}},
                    "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
                    "history": [{"created_by": "unlockd tests"}],
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
