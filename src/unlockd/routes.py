"""The sidecar's HTTP endpoints: parse and validate, call one service, shape the response."""

from __future__ import annotations

import logging
import shutil
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from unlockd.errors import (
    CiphertextError,
    InvalidInputError,
    NotAuthenticatedError,
    NotFoundError,
    UnlockdError,
    UpstreamError,
)
from unlockd.httputil import if_range_allows, parse_range, read_json_object
from unlockd.models import validate_name
from unlockd.multipart import MultipartReader, Part
from unlockd.openapi import SIDECAR_DOCUMENT, openapi_endpoint
from unlockd.page import operator_page

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from unlockd.api_client import ResourceInfo
    from unlockd.config import Settings
    from unlockd.transfers import Download

__all__ = ["MAX_JSON_BODY", "routes"]

MAX_JSON_BODY = 64 * 1024
DEFAULT_FOLDER = "models"
# /ready answers probes that have short timeouts of their own: a hung upstream is "not ready".
READY_UPSTREAM_TIMEOUT = 2.0
logger = logging.getLogger(__name__)


async def health(request: Request) -> JSONResponse:  # noqa: ARG001 - the endpoint signature
    """Liveness: answers from memory only."""
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> JSONResponse:
    """Readiness: the cache directory is writable, has free space, and the upstream answers."""
    state = request.app.state
    reasons = []
    if not await anyio.to_thread.run_sync(state.cache.writable):
        reasons.append(f"model cache dir {state.settings.cache_dir} is not writable")
    if (short := await anyio.to_thread.run_sync(_free_space_shortfall, state.settings)) is not None:
        reasons.append(short)
    try:
        with anyio.fail_after(READY_UPSTREAM_TIMEOUT):
            await state.api.check_upstream()
    except UpstreamError as exc:
        reasons.append(f"upstream: {exc.message}")
    except TimeoutError:
        reasons.append(f"upstream: no answer to its health check in {READY_UPSTREAM_TIMEOUT:g} s")
    if reasons:
        return JSONResponse({"detail": "not ready", "reasons": reasons}, status_code=503)
    return JSONResponse({"status": "ready"})


def _free_space_shortfall(settings: Settings) -> str | None:
    """Why the cache's filesystem has too little free space for ``--cache-min-free``, or None."""
    try:
        usage = shutil.disk_usage(settings.cache_dir)
    except OSError as exc:
        return f"model cache dir {settings.cache_dir}: {exc.strerror or exc}"
    wanted = settings.cache_min_free.bytes_of(usage.total)
    if usage.free >= wanted:
        return None
    return (
        f"model cache filesystem has {usage.free} bytes free, less than --cache-min-free "
        f"({settings.cache_min_free}: {wanted} bytes)"
    )


async def status(request: Request) -> JSONResponse:
    """Authentication status and where models are cached; never secrets."""
    state = request.app.state
    return JSONResponse(
        {
            "authenticated": state.api.authenticated,
            "email": state.api.email,
            "model_cache_dir": str(state.settings.cache_dir),
            "upstream_url": state.settings.upstream_url,
            "unlock_state": state.unlock.status()["state"],
        }
    )


async def login(request: Request) -> JSONResponse:
    """Verify credentials at the upstream and keep them for later requests."""
    body = await read_json_object(request, MAX_JSON_BODY)
    email, password = _credentials(body)
    await request.app.state.api.login(email, password)
    return JSONResponse({"status": "ok"})


async def load(request: Request) -> Response:
    """Stream a whole resource decrypted; the path names the file, the body may add a folder."""
    filename = validate_name(request.path_params["filename"], "filename")
    body = await read_json_object(request, MAX_JSON_BODY, required=False)
    if "filename" in body and body["filename"] != filename:
        validate_name(body["filename"], "filename")
        msg = f"body filename {body['filename']!r} does not match the path's {filename!r}"
        raise InvalidInputError(msg)
    folder = validate_name(body.get("folder", DEFAULT_FOLDER), "folder")
    download = await request.app.state.transfers.open_download(folder, filename)
    return await DownloadResponse.create(download)


async def resource(request: Request) -> Response:
    """GET or HEAD a resource, honouring one byte range (RFC 9110) for resumes."""
    folder = validate_name(request.path_params["folder"], "folder")
    filename = validate_name(request.path_params["filename"], "filename")
    transfers = request.app.state.transfers
    range_header = request.headers.get("range")
    if range_header is None and request.method == "GET":
        return await DownloadResponse.create(await transfers.open_download(folder, filename))

    info: ResourceInfo = await transfers.stat(folder, filename)
    size = info.plaintext_size
    etag = _etag(info.etag)
    byte_range = None
    if if_range_allows(request.headers.get("if-range"), etag):
        byte_range = parse_range(range_header, size)
    if request.method == "HEAD":
        start, end = (0, size) if byte_range is None else byte_range
        headers = _content_headers(size, etag, start, end, partial=byte_range is not None)
        return Response(status_code=206 if byte_range else 200, headers=headers)
    download = await transfers.open_download(folder, filename, byte_range, resource=info)
    return await DownloadResponse.create(download, partial=byte_range is not None)


async def upload(request: Request) -> JSONResponse:
    """Encrypt a multipart upload as it streams in and publish it under its folder."""
    filename = validate_name(request.path_params["filename"], "filename")
    state = request.app.state
    form = _UploadForm(
        MultipartReader(request.headers, request.stream(), max_size=state.settings.max_upload)
    )
    try:
        data = await form.data_part()
        result = await state.transfers.upload(filename, data, folder=form.folder)
    except ClientDisconnect:
        logger.info("client disconnected during the upload of %r; nothing published", filename)
        return JSONResponse({"detail": "client disconnected"}, status_code=400)
    return JSONResponse(result)


class _UploadForm:
    """The upload form: the ``data`` part, and a ``folder`` field before or after it."""

    def __init__(self, reader: MultipartReader) -> None:
        self._reader = reader
        self._folder: str | None = None

    async def data_part(self) -> Part:
        """Read fields up to the ``data`` part and return it, unread."""
        async for part in self._reader:
            if part.name == "data":
                return part
            await self._field(part)
        raise InvalidInputError("missing the file part 'data'")

    async def folder(self) -> str:
        """Read the rest of the form (after the data part) and return the validated folder."""
        async for part in self._reader:
            if part.name == "data":
                raise InvalidInputError("the file part 'data' was given twice")
            await self._field(part)
        return self._folder or DEFAULT_FOLDER

    async def _field(self, part: Part) -> None:
        if part.name != "folder":
            return  # unknown fields are skipped, as HTML forms may add some
        if self._folder is not None:
            raise InvalidInputError("the form field 'folder' was given twice")
        self._folder = validate_name(await part.text(), "folder")


async def unlock(request: Request) -> JSONResponse:
    """Start unlocking the image archive in the background."""
    body = await read_json_object(request, MAX_JSON_BODY)
    email, password = _credentials(body)
    state = request.app.state
    return JSONResponse(await state.unlock.start(email, password))


async def unlock_status(request: Request) -> JSONResponse:
    """Progress of the current or last unlock run."""
    return JSONResponse(request.app.state.unlock.status())


async def metrics(request: Request) -> Response:
    """Prometheus exposition of this app's counters."""
    body, content_type = request.app.state.metrics.render()
    return Response(body, headers={"Content-Type": content_type})


async def cache_list(request: Request) -> JSONResponse:
    """The cached entries (and downloads in progress) with their resources' names."""
    entries = await request.app.state.cache.entries()
    return JSONResponse({"entries": [entry.to_json() for entry in entries]})


async def cache_drop(request: Request) -> Response:
    """Remove the cached versions of one resource (409 while one is in use)."""
    folder = validate_name(request.path_params["folder"], "folder")
    filename = validate_name(request.path_params["filename"], "filename")
    if not await request.app.state.cache.drop(folder, filename):
        msg = f"{folder}/{filename} is not cached"
        raise NotFoundError(msg)
    return Response(status_code=204)


async def pull(request: Request) -> JSONResponse:
    """POST starts a background fetch into the cache (or joins it); GET shows its state."""
    folder = validate_name(request.path_params["folder"], "folder")
    filename = validate_name(request.path_params["filename"], "filename")
    state = request.app.state
    if request.method == "POST":
        if state.api.email is None:
            raise NotAuthenticatedError("not logged in: POST /login first")
        return JSONResponse(state.pulls.start(folder, filename).to_json(), status_code=202)
    pulls = state.pulls
    return JSONResponse(pulls.get(folder, filename).to_json())


class DownloadResponse(StreamingResponse):
    """Streams a :class:`Download`; always closes it, and aborts on a failed segment.

    A segment that fails authentication after the headers are out cannot become an error
    response any more: returning without the final body message makes the server close the
    connection short of Content-Length, so the client sees a truncated transfer.
    """

    def __init__(self, download: Download, *, partial: bool = False) -> None:
        headers = _content_headers(
            download.size, _etag(download.etag), download.start, download.end, partial=partial
        )
        super().__init__(
            download,
            status_code=206 if partial else 200,
            headers=headers,
            media_type="application/octet-stream",
        )
        self.download = download

    @classmethod
    async def create(cls, download: Download, *, partial: bool = False) -> DownloadResponse:
        """Return the response for ``download``, or close the download and raise."""
        try:
            return cls(download, partial=partial)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await download.aclose()
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except UnlockdError as exc:
            # The first segment was verified before the headers went out, so this is mid-body:
            # abort. A failed segment was already logged and counted by the download.
            if not isinstance(exc, CiphertextError):
                logger.warning("download aborted mid-body: %s", exc.message)
        finally:
            with anyio.CancelScope(shield=True):
                await self.download.aclose()


def _content_headers(
    size: int, etag: str, start: int, end: int, *, partial: bool
) -> dict[str, str]:
    headers = {
        "Content-Length": str(end - start),
        "Content-Type": "application/octet-stream",
        "Accept-Ranges": "bytes",
        "ETag": etag,
    }
    if partial:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return headers


def _etag(upstream_etag: str) -> str:
    # ApiClient admits only etagc characters, so the value cannot break (or forge) headers.
    return f'"{upstream_etag}"'


def _credentials(body: dict[str, Any]) -> tuple[str, str]:
    email, password = body.get("email"), body.get("password")
    if not isinstance(email, str) or not email.strip():
        raise InvalidInputError("'email' must be a non-empty string")
    if not isinstance(password, str) or not password:
        raise InvalidInputError("'password' must be a non-empty string")
    return email.strip(), password


routes = [
    Route("/", operator_page, methods=["GET"]),
    Route("/openapi.json", openapi_endpoint(SIDECAR_DOCUMENT), methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/status", status, methods=["GET"]),
    Route("/login", login, methods=["POST"]),
    Route("/load/{filename}", load, methods=["POST"]),
    Route("/resources/{folder}/{filename}", resource, methods=["GET", "HEAD"]),
    Route("/upload/{filename}", upload, methods=["POST"]),
    Route("/unlock", unlock, methods=["POST"]),
    Route("/unlock/status", unlock_status, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/cache", cache_list, methods=["GET"]),
    Route("/cache/{folder}/{filename}", cache_drop, methods=["DELETE"]),
    Route("/pull/{folder}/{filename}", pull, methods=["GET", "POST"]),
]
