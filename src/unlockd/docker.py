"""Stream ``docker save`` archives into and out of a Docker engine (aiodocker)."""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.parse
from typing import TYPE_CHECKING, Any

import aiodocker
import aiohttp

from unlockd.blobs import StreamedBody
from unlockd.crypto_stream import SEGMENT_SIZE
from unlockd.errors import DockerError

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping


__all__ = ["DEFAULT_DOCKER_HOST", "DockerLoader", "resolve_docker_host"]

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
_LOADED = "Loaded image: "
_LOADED_ID = "Loaded image ID: "

logger = logging.getLogger(__name__)


def resolve_docker_host(
    docker_host: str | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """The engine address: ``docker_host`` if given, else ``DOCKER_HOST``, else the default socket.

    The one place the default is decided (the Docker CLI's rule). Resolved here, not by
    aiodocker, so that a missing socket is a clear "unreachable" rather than aiodocker's
    failed assertion. The sidecar passes Settings.docker_host (itself read from
    DOCKER_HOST); ``unlockd seal --image`` passes nothing.
    """
    if docker_host:
        return docker_host
    env = os.environ if environ is None else environ
    return env.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST


class DockerLoader:
    """Streams ``docker save`` archives into the engine's image-load API."""

    def __init__(self, docker_host: str | None = None) -> None:
        self.docker_host = resolve_docker_host(docker_host)
        self._client: aiodocker.Docker | None = None

    def _docker(self) -> aiodocker.Docker:
        # Created on first use: the aiohttp session must be made inside the running loop.
        if self._client is None:
            try:
                self._client = aiodocker.Docker(url=self.docker_host)
            except ValueError as exc:
                msg = f"Docker engine unreachable: {self.docker_host}: {exc}"
                raise DockerError(msg) from exc
        return self._client

    async def load(self, tar_stream: AsyncIterable[bytes]) -> list[str]:
        """POST ``tar_stream`` to ``/images/load``; return the loaded tags (or IDs if untagged).

        The body streams as it is produced. If ``tar_stream`` raises, the request is cut off
        before its end, so the engine discards the partial archive, and that exception is
        re-raised as is. Engine failures raise :class:`DockerError`.
        """
        # aiohttp wraps a failing body in a connection error, which aiodocker reports as
        # "cannot connect": the body keeps the real cause to re-raise it.
        body = StreamedBody(tar_stream)
        images: list[str] = []
        try:
            with self._map_errors("Docker rejected the archive"):
                stream = self._import(body)
                async for item in stream:
                    images.extend(_loaded_images(item))
        except DockerError:
            if body.failure is not None:
                raise body.failure from None
            raise
        # aiodocker ends a JSON stream quietly when the connection drops.
        if body.failure is not None:
            raise body.failure
        return images

    def _import(self, body: StreamedBody) -> AsyncIterator[Any]:
        # aiodocker's import_image cannot ask for quiet=1, which `docker load` uses when its
        # output is not a terminal: without it the engine streams a progress message per
        # layer chunk, which we would parse for nothing.
        docker = self._docker()
        response = docker._query_chunked_post(  # noqa: SLF001 - see above
            "images/load",
            params={"quiet": "1"},
            data=body,
            headers={"Content-Type": "application/x-tar"},
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return docker.images._handle_stream(response)  # type: ignore[no-untyped-call,no-any-return]  # noqa: SLF001

    async def export(self, names: list[str]) -> AsyncIterator[bytes]:
        """Stream one ``docker save`` archive of the images ``names`` (``GET /images/get``)."""
        # aiodocker's export_image takes one name; the endpoint takes several, sharing layers.
        query = urllib.parse.urlencode([("names", name) for name in names])
        with self._map_errors(f"Docker cannot export {', '.join(names)}"):
            async with self._docker()._query(f"images/get?{query}") as response:  # noqa: SLF001
                try:
                    # Segment-sized chunks: what the encryptor that consumes them seals at once.
                    async for chunk in response.content.iter_chunked(SEGMENT_SIZE):
                        yield chunk
                finally:
                    response.close()  # aiodocker's _query leaves releasing to the caller

    @contextlib.contextmanager
    def _map_errors(self, refused: str) -> Iterator[None]:
        """Turn aiodocker's and aiohttp's errors into DockerError; ``refused`` leads a refusal."""
        try:
            yield
        except aiodocker.DockerError as exc:
            # aiodocker's status 900 means the connection could not be made.
            if exc.status < 900 or isinstance(exc, aiodocker.DockerStreamError):
                msg = f"{refused}: {exc.message.strip()}"
            else:
                msg = f"Docker engine unreachable: {exc.message.strip()}"
            raise DockerError(msg) from exc
        except aiohttp.ClientError as exc:
            msg = f"Docker engine unreachable: connection to {self.docker_host} failed: {exc}"
            raise DockerError(msg) from exc

    async def close(self) -> None:
        """Close the connection pool; the loader can be used again afterwards."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


def _loaded_images(item: Any) -> list[str]:
    if not isinstance(item, dict):
        return []
    out: list[str] = []
    for line in str(item.get("stream", "")).splitlines():
        if line.startswith(_LOADED):
            out.append(line.removeprefix(_LOADED).strip())
        elif line.startswith(_LOADED_ID):
            out.append(line.removeprefix(_LOADED_ID).strip())
    return out
