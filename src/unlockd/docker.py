"""Stream ``docker save`` archives into and out of a Docker engine (aiodocker)."""

from __future__ import annotations

import logging
import os
import urllib.parse
from typing import TYPE_CHECKING, Any

import aiodocker
import aiohttp
from aiohttp.payload import AsyncIterablePayload

from unlockd.crypto_stream import SEGMENT_SIZE
from unlockd.errors import DockerError

if TYPE_CHECKING:
    import asyncio
    from collections.abc import AsyncIterable, AsyncIterator, Mapping

    from aiohttp.abc import AbstractStreamWriter

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
        source_failure: list[BaseException] = []

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in tar_stream:
                    yield chunk
            except Exception as exc:
                # aiohttp wraps a failing body in a connection error, which aiodocker reports
                # as "cannot connect"; keep the real cause to re-raise it.
                source_failure.append(exc)
                raise

        images: list[str] = []
        try:
            stream = self._docker().images.import_image(_AbortingBody(body()), stream=True)
            async for item in stream:
                images.extend(_loaded_images(item))
        except aiodocker.DockerError as exc:
            if source_failure:
                raise source_failure[0] from None
            raise _translate(exc) from exc
        except aiohttp.ClientError as exc:
            if source_failure:
                raise source_failure[0] from None
            msg = f"Docker engine unreachable: connection to {self.docker_host} failed: {exc}"
            raise DockerError(msg) from exc
        # aiodocker ends a JSON stream quietly when the connection drops.
        if source_failure:
            raise source_failure[0]
        return images

    async def export(self, names: list[str]) -> AsyncIterator[bytes]:
        """Stream one ``docker save`` archive of the images ``names`` (``GET /images/get``)."""
        # aiodocker's export_image takes one name; the endpoint takes several, sharing layers.
        query = urllib.parse.urlencode([("names", name) for name in names])
        try:
            async with self._docker()._query(f"images/get?{query}") as response:  # noqa: SLF001
                try:
                    # Segment-sized chunks: what the encryptor that consumes them seals at once.
                    async for chunk in response.content.iter_chunked(SEGMENT_SIZE):
                        yield chunk
                finally:
                    response.close()  # aiodocker's _query leaves releasing to the caller
        except aiodocker.DockerError as exc:
            if exc.status >= 900:
                raise _translate(exc) from exc
            msg = f"Docker cannot export {', '.join(names)}: {exc.message.strip()}"
            raise DockerError(msg) from exc
        except aiohttp.ClientError as exc:
            msg = f"Docker engine unreachable: connection to {self.docker_host} failed: {exc}"
            raise DockerError(msg) from exc

    async def close(self) -> None:
        """Close the connection pool; the loader can be used again afterwards."""
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


class _AbortingBody(AsyncIterablePayload):
    """A streamed request body whose connection is aborted, not flushed, when it fails.

    aiohttp closes the connection gracefully, which first sends what is buffered and may
    linger while the engine reads; aborting cuts the archive off at once and frees the socket.
    """

    async def write_with_length(
        self, writer: AbstractStreamWriter, content_length: int | None
    ) -> None:
        # Taken now: aiohttp drops the protocol's transport when it closes the connection.
        transport: asyncio.Transport | None = getattr(writer, "transport", None)
        try:
            await super().write_with_length(writer, content_length)
        except BaseException:
            if transport is not None:
                transport.abort()
            raise


def _translate(exc: aiodocker.DockerError) -> DockerError:
    if isinstance(exc, aiodocker.DockerStreamError) or exc.status < 900:
        msg = f"Docker rejected the archive: {exc.message.strip()}"
    else:
        # aiodocker's status 900 means the connection could not be made.
        msg = f"Docker engine unreachable: {exc.message.strip()}"
    return DockerError(msg)


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
