"""Thin handlers of the upstream protocol (SPEC.md §5): parse, call the store, shape the reply."""

from __future__ import annotations

import base64
import os
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from unlockd.errors import (
    CredentialsRejectedError,
    InvalidInputError,
    InvalidKeyError,
    NotFoundError,
)
from unlockd.httputil import if_range_allows, parse_range, read_json_object
from unlockd.hub.auth import Principal, Role, dummy_password_hash, verify_password
from unlockd.hub.blobstore import DirectoryBlobs
from unlockd.hub.openapi import HUB_DOCUMENT
from unlockd.hub.responses import BlobResponse
from unlockd.models import validate_name
from unlockd.openapi import openapi_endpoint

if TYPE_CHECKING:
    from starlette.requests import Request

    from unlockd.hub.auth import TokenStore
    from unlockd.hub.store import Store

__all__ = ["routes"]

# Small parts are a few KiB (base64 in JSON); 1 MiB leaves room for larger configured sizes.
_MAX_JSON = 1024 * 1024
_MAX_CREDENTIAL = 1024
_IMMUTABLE = "public, max-age=31536000, immutable"


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


async def _authorize(request: Request, role: Role) -> Principal:
    tokens: TokenStore = request.app.state.tokens
    principal = await tokens.check(request.headers.get("authorization"))
    principal.require(role)
    return principal


def _name(request: Request, param: str, what: str) -> str:
    return validate_name(request.path_params[param], what)


async def _json_object(request: Request) -> dict[str, Any]:
    return await read_json_object(request, _MAX_JSON)


def _text_field(body: dict[str, Any], field: str, limit: int = _MAX_CREDENTIAL) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value or len(value) > limit:
        msg = f"'{field}' must be a non-empty string of at most {limit} characters"
        raise InvalidInputError(msg)
    return value


def _base64_field(body: dict[str, Any], field: str) -> bytes:
    value = body.get(field)
    try:
        if not isinstance(value, str):
            raise TypeError  # noqa: TRY301 - one message for every malformed value
        return base64.b64decode(value, validate=True)
    except (TypeError, ValueError):  # binascii.Error, or a str that is not ASCII
        msg = f"'{field}' must be a standard base64 string"
        raise InvalidInputError(msg) from None


def _key_field(body: dict[str, Any]) -> bytes:
    key = _base64_field(body, "key")
    if len(key) != 32:
        msg = f"'key' must be base64 of 32 bytes, got {len(key)} bytes"
        raise InvalidKeyError(msg)
    return key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def health(_request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def login(request: Request) -> Response:
    body = await _json_object(request)
    email = _text_field(body, "email", 254)
    password = _text_field(body, "password")
    user = await _store(request).get_user(email)
    # Unknown emails cost one scrypt too, and get the same answer as a wrong password.
    stored = user[0] if user is not None else dummy_password_hash()
    matches = await anyio.to_thread.run_sync(
        verify_password, password, stored, limiter=request.app.state.password_limiter
    )
    if user is None or not matches:
        msg = "invalid email or password"
        raise CredentialsRejectedError(msg)
    tokens: TokenStore = request.app.state.tokens
    token = await tokens.issue(Principal(email, user[1]))
    # "role" is an extension of the protocol: clients such as `unlockd seal` fail fast on it.
    return JSONResponse(
        {
            "token": token,
            "token_type": "bearer",
            "expires_in": int(tokens.ttl),
            "role": user[1].value,
        }
    )


async def get_resource(request: Request) -> Response:
    await _authorize(request, Role.READER)
    folder, name = _name(request, "folder", "folder"), _name(request, "name", "filename")
    resource = await _store(request).get_resource(folder, name)
    return JSONResponse(
        {
            "key": _b64(resource.key),
            "small": _b64(resource.small),
            "big_size": resource.big_size,
            "etag": resource.etag,
            "big_url": _store(request).big_url(resource),
        }
    )


async def put_resource(request: Request) -> Response:
    principal = await _authorize(request, Role.PUBLISHER)
    folder, name = _name(request, "folder", "folder"), _name(request, "name", "filename")
    body = await _json_object(request)
    upload_id = _text_field(body, "upload_id", 64)
    key = _key_field(body)
    small = _base64_field(body, "small")
    if not small:
        msg = "'small' must not be empty"
        raise InvalidInputError(msg)
    etag = await _store(request).publish(
        folder, name, upload_id, key=key, small=small, by=principal.email
    )
    resource = await _store(request).get_resource(folder, name)
    # A concurrent publish may have replaced it already: its URL is then the newer one's.
    big_url = _store(request).big_url(resource) if resource.etag == etag else f"/blobs/{etag}"
    return JSONResponse({"etag": etag, "big_url": big_url}, status_code=201)


async def delete_resource(request: Request) -> Response:
    await _authorize(request, Role.PUBLISHER)
    folder, name = _name(request, "folder", "folder"), _name(request, "name", "filename")
    await _store(request).delete_resource(folder, name)
    return Response(status_code=204)


async def create_upload(request: Request) -> Response:
    principal = await _authorize(request, Role.PUBLISHER)
    upload_id = await _store(request).create_upload(principal.email)
    return JSONResponse({"upload_id": upload_id}, status_code=201)


async def put_upload(request: Request) -> Response:
    principal = await _authorize(request, Role.PUBLISHER)
    try:
        result = await _store(request).write_upload(
            request.path_params["upload_id"], principal.email, request.stream()
        )
    except ClientDisconnect:
        # The store has dropped the upload; nobody is left to read a reply or an error log.
        return JSONResponse({"detail": "the request body was cut off"}, status_code=400)
    return JSONResponse({"size": result.size, "sha256": result.sha256})


async def delete_upload(request: Request) -> Response:
    principal = await _authorize(request, Role.PUBLISHER)
    await _store(request).delete_upload(request.path_params["upload_id"], principal.email)
    return Response(status_code=204)


def _open_blob(path: os.PathLike[str]) -> tuple[int, int]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        msg = "blob not found"
        raise NotFoundError(msg) from None
    return fd, os.fstat(fd).st_size


async def get_blob(request: Request) -> Response:
    store = _store(request)
    key = await store.blob_object(request.path_params["etag"])
    if not isinstance(store.blobs, DirectoryBlobs):
        # Blob bytes never pass through a hub on a bucket: the client goes to the store.
        url = store.blobs.url(key)
        return Response(
            status_code=307, headers={"location": url or "", "cache-control": "no-store"}
        )
    fd, size = await anyio.to_thread.run_sync(_open_blob, store.blobs.path(key))
    etag = request.path_params["etag"]
    try:
        headers = {"etag": f'"{etag}"', "cache-control": _IMMUTABLE, "accept-ranges": "bytes"}
        byte_range = None
        if if_range_allows(request.headers.get("if-range"), headers["etag"]):
            byte_range = parse_range(request.headers.get("range"), size)
    except BaseException:
        os.close(fd)
        raise
    send_body = request.method != "HEAD"
    if byte_range is None:
        return BlobResponse(fd, 0, size, headers=headers, send_body=send_body)
    start, end = byte_range
    headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    return BlobResponse(fd, start, end, status_code=206, headers=headers, send_body=send_body)


async def put_key(request: Request) -> Response:
    await _authorize(request, Role.PUBLISHER)
    key_id = _name(request, "key_id", "key id")
    key = _key_field(await _json_object(request))
    created = await _store(request).put_key(key_id, key)
    return JSONResponse({"key_id": key_id}, status_code=201 if created else 200)


async def get_key(request: Request) -> Response:
    await _authorize(request, Role.READER)
    key_id = _name(request, "key_id", "key id")
    key = await _store(request).get_key(key_id)
    return JSONResponse({"key": _b64(key)})


def _one_route_per_path(routes: list[Route]) -> list[Route]:
    """Merge the routes of each path into one, so that a 405's Allow lists all its methods.

    Starlette answers 405 from the first route whose path matches, naming only that route's
    methods; RFC 9110 §15.5.6 wants every method the resource supports.
    """
    by_path: dict[str, list[Route]] = {}
    for route in routes:
        by_path.setdefault(route.path, []).append(route)
    return [
        group[0] if len(group) == 1 else _merged(path, group) for path, group in by_path.items()
    ]


def _merged(path: str, group: list[Route]) -> Route:
    handlers = {method: route.endpoint for route in group for method in route.methods or ()}

    async def endpoint(request: Request) -> Response:
        response: Response = await handlers[request.method](request)
        return response

    return Route(path, endpoint, methods=list(handlers))


routes = [
    Route("/openapi.json", openapi_endpoint(HUB_DOCUMENT), methods=["GET"]),
    Route("/health", health, methods=["GET"]),
    Route("/auth/login", login, methods=["POST"]),
    Route("/resources/{folder}/{name}", get_resource, methods=["GET"]),
    Route("/resources/{folder}/{name}", put_resource, methods=["PUT"]),
    Route("/resources/{folder}/{name}", delete_resource, methods=["DELETE"]),
    Route("/uploads", create_upload, methods=["POST"]),
    Route("/uploads/{upload_id}", put_upload, methods=["PUT"]),
    Route("/uploads/{upload_id}", delete_upload, methods=["DELETE"]),
    Route("/blobs/{etag}", get_blob, methods=["GET", "HEAD"]),
    Route("/keys/{key_id}", put_key, methods=["PUT"]),
    Route("/keys/{key_id}", get_key, methods=["GET"]),
]
routes = _one_route_per_path(routes)
