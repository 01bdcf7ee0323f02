"""OpenAPI 3.1 documents: the sidecar's here, the hub's in ``hub/openapi.py``, and their parts.

The documents are written out beside the routes rather than derived from them: the handlers
parse their bodies themselves, so there is nothing to derive request schemas from, and a
document written out reads as the contract it is. Two things keep them honest: a test compares
each document with its app's routes (every route documented, nothing documented that is not
routed), and schemathesis runs each live server against its document.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping

    from starlette.requests import Request

__all__ = [
    "BYTES_HEADERS",
    "EXTRA_FIELDS",
    "HEALTH",
    "OCTETS",
    "OPENAPI",
    "RANGE_HEADERS",
    "RANGE_PARAMETERS",
    "SIDECAR_DOCUMENT",
    "UNSATISFIABLE",
    "binary_response",
    "document",
    "error_response",
    "json_body",
    "json_response",
    "name_parameter",
    "openapi_endpoint",
    "operation",
    "ref",
]

JSON = "application/json"
OCTETS = "application/octet-stream"
# Both servers bound headers, connections and JSON bodies the same way (SPEC.md §12).
_LIMIT_RESPONSES: dict[str, str] = {
    "431": "Request headers too large",
    "503": "Too many concurrent connections",
}


def ref(name: str, kind: str = "schemas") -> dict[str, str]:
    """A ``$ref`` to ``#/components/<kind>/<name>``."""
    return {"$ref": f"#/components/{kind}/{name}"}


def json_body(schema: Mapping[str, Any], *, required: bool = True) -> dict[str, Any]:
    """A JSON request body of ``schema``."""
    return {"required": required, "content": {JSON: {"schema": schema}}}


def json_response(
    description: str, schema: Mapping[str, Any], headers: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A JSON response of ``schema``."""
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = dict(headers)
    return response


def error_response(description: str, headers: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An error response: the ``{"detail": ...}`` body every error has."""
    return json_response(description, ref("Error"), headers)


def binary_response(
    description: str, headers: Mapping[str, Any], *, body: bool = True
) -> dict[str, Any]:
    """A byte stream (``body=False`` for HEAD: the same headers, no content)."""
    response: dict[str, Any] = {"description": description, "headers": dict(headers)}
    if body:
        schema = {"type": "string", "contentMediaType": OCTETS}
        response["content"] = {OCTETS: {"schema": schema}}
    return response


def operation(  # noqa: PLR0913 - the parts of an OpenAPI operation, keyword-only
    operation_id: str,
    summary: str,
    responses: Mapping[str, Mapping[str, Any]],
    *,
    errors: Mapping[str, str] | None = None,
    parameters: Iterable[Mapping[str, Any]] = (),
    body: Mapping[str, Any] | None = None,
    security: list[dict[str, list[str]]] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """An operation object; ``errors`` maps status codes to descriptions of error responses."""
    all_responses = dict(responses)
    for status, text in {**(errors or {}), **_LIMIT_RESPONSES}.items():
        all_responses.setdefault(status, error_response(text))
    op: dict[str, Any] = {"operationId": operation_id, "summary": summary}
    if description is not None:
        op["description"] = description
    if parameters:
        op["parameters"] = list(parameters)
    if body is not None:
        op["requestBody"] = dict(body)
    if security is not None:
        op["security"] = security
    op["responses"] = dict(sorted(all_responses.items()))
    return op


def openapi_endpoint(document: Mapping[str, Any]) -> Callable[[Request], Awaitable[Response]]:
    """A handler answering ``document`` as JSON (serialized once)."""
    body = json.dumps(document, separators=(",", ":")).encode()

    async def openapi(_request: Request) -> Response:
        return Response(body, media_type=JSON)

    return openapi


# Parts both documents use.

# The server ignores unknown fields of a JSON body; the document asks clients not to send any.
EXTRA_FIELDS = {"additionalProperties": False}
ERROR_SCHEMA = {
    "type": "object",
    "required": ["detail"],
    "properties": {"detail": {"type": "string"}},
}
NAME_SCHEMA = {
    "type": "string",
    "pattern": "^[A-Za-z0-9._-]{1,255}$",
    "not": {"enum": [".", ".."]},
    "description": "One path segment: 1-255 characters of A-Z a-z 0-9 . _ -, not . or ..",
}
STATUS_OK = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"const": "ok"}},
}
HEALTH = operation(
    "health",
    "Liveness",
    {"200": json_response("Alive", STATUS_OK)},
    security=[],
    description="Answers from memory only: never touches the upstream, the disk or Docker.",
)
OPENAPI = operation(
    "openapi",
    "This document",
    {"200": json_response("The OpenAPI 3.1 document", {"type": "object"})},
)


def name_parameter(name: str, description: str) -> dict[str, Any]:
    """A path parameter holding a name (folder, filename, key id)."""
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": ref("Name"),
    }


RANGE_PARAMETERS = [
    {
        "name": "Range",
        "in": "header",
        "required": False,
        "description": "One byte range: bytes=a-b, bytes=a- or bytes=-n (others are ignored)",
        "schema": {"type": "string"},
    },
    {
        "name": "If-Range",
        "in": "header",
        "required": False,
        "description": "The ETag of the client's partial copy; another value sends the whole",
        "schema": {"type": "string"},
    },
]


def _header(description: str, schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "required": True, "schema": schema or {"type": "string"}}


DIGITS = {"type": "string", "pattern": "^[0-9]+$"}
BYTES_HEADERS = {
    "Content-Length": _header("Bytes in this response", DIGITS),
    "Accept-Ranges": _header("Always bytes", {"const": "bytes"}),
    "ETag": _header("Strong entity tag of this version", {"pattern": '^"[^"]+"$'}),
}
RANGE_HEADERS = {
    **BYTES_HEADERS,
    "Content-Range": _header(
        "The range sent, of the whole", {"pattern": "^bytes [0-9]+-[0-9]+/[0-9]+$"}
    ),
}
UNSATISFIABLE = error_response(
    "No byte of the range exists",
    {"Content-Range": _header("The size", {"pattern": "^bytes \\*/[0-9]+$"})},
)


def document(  # noqa: PLR0913 - the parts of an OpenAPI document, keyword-only
    title: str,
    description: str,
    paths: Mapping[str, Mapping[str, Any]],
    *,
    schemas: Mapping[str, Any],
    security_schemes: Mapping[str, Any],
    security: list[dict[str, list[str]]],
) -> dict[str, Any]:
    """A whole OpenAPI 3.1 document with the shared ``Error`` and ``Name`` schemas."""
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "0.1.0", "description": description},
        "paths": dict(paths),
        "components": {
            "schemas": {"Error": ERROR_SCHEMA, "Name": NAME_SCHEMA, **schemas},
            "securitySchemes": dict(security_schemes),
        },
        "security": security,
    }


# The sidecar (SPEC.md §4, §12, §13).

_FOLDER = name_parameter("folder", "Folder of the resource")
_FILENAME = name_parameter("filename", "Name of the resource (also its associated data)")
_LOCAL = {
    "401": "Not logged in at the upstream, or the local API token is missing or wrong",
}
_UPSTREAM = {
    "403": "The upstream does not allow this account to do it",
    "502": "The upstream is unreachable or sent data that does not authenticate",
}
_CREDENTIALS = {
    "type": "object",
    **EXTRA_FIELDS,
    "required": ["email", "password"],
    "properties": {
        "email": {"type": "string", "minLength": 1, "pattern": "\\S"},
        "password": {"type": "string", "minLength": 1, "format": "password"},
    },
}
_UNLOCK_STATES = [
    "idle",
    "authenticating",
    "downloading_key",
    "decrypting",
    "loading_images",
    "ready",
    "error",
]
_NULLABLE_STRING = {"type": ["string", "null"]}
_COUNT = {"type": "integer", "minimum": 0}

_SIDECAR_SCHEMAS = {
    "Credentials": _CREDENTIALS,
    "Status": {
        "type": "object",
        "required": ["authenticated", "email", "model_cache_dir"],
        "properties": {
            "authenticated": {
                "type": "boolean",
                "description": "Credentials are set and the upstream accepted them last time",
            },
            "email": _NULLABLE_STRING,
            "model_cache_dir": {"type": "string"},
            "upstream_url": {"type": "string"},
            "unlock_state": {"enum": _UNLOCK_STATES},
        },
    },
    "NotReady": {
        "type": "object",
        "required": ["detail"],
        "properties": {
            "detail": {"type": "string"},
            "reasons": {"type": "array", "items": {"type": "string"}},
        },
    },
    "LoadRequest": {
        "type": "object",
        **EXTRA_FIELDS,
        "properties": {
            "filename": {**ref("Name"), "description": "If given, equal to the path's (else 422)"},
            "folder": {**ref("Name"), "default": "models"},
        },
    },
    "UploadForm": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "contentMediaType": OCTETS},
            "folder": {**ref("Name"), "default": "models"},
        },
    },
    "Uploaded": {
        "type": "object",
        "required": ["status", "folder", "filename", "size", "etag"],
        "properties": {
            "status": {"const": "ok"},
            "folder": ref("Name"),
            "filename": ref("Name"),
            "size": _COUNT,
            "etag": {"type": "string"},
        },
    },
    "CacheEntry": {
        "type": "object",
        "required": ["folder", "filename", "etag", "size", "last_used", "complete"],
        "properties": {
            "folder": ref("Name"),
            "filename": ref("Name"),
            "etag": {"type": "string"},
            "size": {**_COUNT, "description": "Bytes of the cached big part (ciphertext)"},
            "last_used": {"type": "string", "format": "date-time"},
            "complete": {"type": "boolean", "description": "False while it is downloading"},
        },
    },
    "Pull": {
        "type": "object",
        "required": ["state", "bytes_done", "bytes_total"],
        "properties": {
            "state": {"enum": ["downloading", "verifying", "complete", "error"]},
            "bytes_done": {**_COUNT, "description": "Plaintext bytes authenticated so far"},
            "bytes_total": {"type": ["integer", "null"], "minimum": 0},
            "detail": {"type": "string", "description": "Why it failed (state error)"},
        },
    },
    "UnlockStatus": {
        "type": "object",
        "required": ["state", "error", "progress", "images"],
        "properties": {
            "state": {"enum": _UNLOCK_STATES},
            "error": _NULLABLE_STRING,
            "progress": {
                "type": "object",
                "required": ["bytes_done", "bytes_total"],
                "properties": {"bytes_done": _COUNT, "bytes_total": _COUNT},
            },
            "images": {"type": "array", "items": {"type": "string"}},
            "started_at": {**_NULLABLE_STRING, "format": "date-time"},
            "finished_at": {**_NULLABLE_STRING, "format": "date-time"},
        },
    },
}

_SIDECAR_PATHS: dict[str, dict[str, Any]] = {
    "/": {
        "get": operation(
            "operatorPage",
            "The operator page",
            {"200": {"description": "HTML", "content": {"text/html": {"schema": {}}}}},
            security=[],
            description="Served without the local API token: the page asks for it.",
        )
    },
    "/openapi.json": {"get": OPENAPI},
    "/health": {"get": HEALTH},
    "/ready": {
        "get": operation(
            "ready",
            "Readiness",
            {
                "200": json_response(
                    "The cache dir is writable and the upstream answers",
                    {"type": "object", "properties": {"status": {"const": "ready"}}},
                ),
                "503": json_response(
                    "Not ready, with the reasons (or too many connections)", ref("NotReady")
                ),
            },
            errors=_LOCAL,
        )
    },
    "/status": {
        "get": operation(
            "status",
            "Login state and model cache dir; never secrets",
            {"200": json_response("The status", ref("Status"))},
            errors=_LOCAL,
        )
    },
    "/login": {
        "post": operation(
            "login",
            "Verify credentials at the upstream and keep them",
            {"200": json_response("Accepted", STATUS_OK)},
            body=json_body(ref("Credentials")),
            errors={
                **_LOCAL,
                "401": "The upstream rejected the credentials (or the local token is missing)",
                "413": "JSON body too large",
                "422": "Invalid body",
                "502": "The upstream is unreachable",
            },
        )
    },
    "/load/{filename}": {
        "post": operation(
            "load",
            "A whole resource, decrypted, as a stream",
            {"200": binary_response("The plaintext", BYTES_HEADERS)},
            parameters=[_FILENAME],
            body=json_body(ref("LoadRequest"), required=False),
            errors={
                **_LOCAL,
                **_UPSTREAM,
                "404": "No such resource",
                "413": "JSON body too large",
                "422": "Invalid name or body",
            },
            description=(
                "The first segment is authenticated before the headers are sent; a later "
                "segment that fails authentication aborts the response short of its length."
            ),
        )
    },
    "/resources/{folder}/{filename}": {
        "get": operation(
            "getResource",
            "A resource, decrypted, whole or one byte range",
            {
                "200": binary_response("The plaintext", BYTES_HEADERS),
                "206": binary_response("The range of the plaintext", RANGE_HEADERS),
                "416": UNSATISFIABLE,
            },
            parameters=[_FOLDER, _FILENAME, *RANGE_PARAMETERS],
            errors={**_LOCAL, **_UPSTREAM, "404": "No such resource", "422": "Invalid name"},
        ),
        "head": operation(
            "headResource",
            "The headers of GET, without the body",
            {
                "200": binary_response("The whole", BYTES_HEADERS, body=False),
                "206": binary_response("The range", RANGE_HEADERS, body=False),
                "416": {"description": "No byte of the range exists"},
            },
            parameters=[_FOLDER, _FILENAME, *RANGE_PARAMETERS],
            errors={**_LOCAL, **_UPSTREAM, "404": "No such resource", "422": "Invalid name"},
        ),
    },
    "/upload/{filename}": {
        "post": operation(
            "upload",
            "Encrypt a multipart upload as it streams in and publish it",
            {"200": json_response("Published", ref("Uploaded"))},
            parameters=[_FILENAME],
            body={
                "required": True,
                "content": {"multipart/form-data": {"schema": ref("UploadForm")}},
            },
            errors={
                **_LOCAL,
                **_UPSTREAM,
                "400": "The client disconnected before the end of the body",
                "404": "No route (a name with an encoded /)",
                "413": "Larger than UNLOCKD_MAX_UPLOAD",
                "422": "Invalid name or multipart body",
            },
        )
    },
    "/cache": {
        "get": operation(
            "listCache",
            "The cached entries (and downloads in progress)",
            {
                "200": json_response(
                    "The entries",
                    {
                        "type": "object",
                        "required": ["entries"],
                        "properties": {"entries": {"type": "array", "items": ref("CacheEntry")}},
                    },
                )
            },
            errors=_LOCAL,
        )
    },
    "/cache/{folder}/{filename}": {
        "delete": operation(
            "dropCacheEntry",
            "Remove the cached versions of one resource",
            {"204": {"description": "Removed"}},
            parameters=[_FOLDER, _FILENAME],
            errors={
                **_LOCAL,
                "404": "Not cached",
                "409": "In use by a download",
                "422": "Invalid name",
            },
        )
    },
    "/pull/{folder}/{filename}": {
        "post": operation(
            "startPull",
            "Start fetching a resource into the cache, or join the pull under way",
            {"202": json_response("Started or joined", ref("Pull"))},
            parameters=[_FOLDER, _FILENAME],
            errors={**_LOCAL, "422": "Invalid name"},
            description="A pulled entry has had every segment authenticated when complete.",
        ),
        "get": operation(
            "getPull",
            "The state of the latest pull of a resource",
            {"200": json_response("The state", ref("Pull"))},
            parameters=[_FOLDER, _FILENAME],
            errors={**_LOCAL, "404": "No pull of this resource", "422": "Invalid name"},
        ),
    },
    "/unlock": {
        "post": operation(
            "unlock",
            "Start decrypting the image archive into Docker",
            {
                "200": json_response(
                    "Started",
                    {"type": "object", "properties": {"state": {"const": "authenticating"}}},
                )
            },
            body=json_body(ref("Credentials")),
            errors={
                **_LOCAL,
                "404": "Encrypted archive not found",
                "409": "A run is in progress",
                "413": "JSON body too large",
                "422": "Invalid body",
            },
        )
    },
    "/unlock/status": {
        "get": operation(
            "unlockStatus",
            "Progress of the current or last unlock",
            {"200": json_response("The state", ref("UnlockStatus"))},
            errors=_LOCAL,
        )
    },
    "/metrics": {
        "get": operation(
            "metrics",
            "Prometheus metrics",
            {
                "200": {
                    "description": "Exposition format",
                    "content": {"text/plain": {"schema": {}}},
                }
            },
            errors=_LOCAL,
        )
    },
}

SIDECAR_DOCUMENT = document(
    "unlockd sidecar",
    "Serves encrypted models decrypted as streams, encrypts uploads, unlocks Docker images.",
    _SIDECAR_PATHS,
    schemas=_SIDECAR_SCHEMAS,
    security_schemes={
        "localToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "UNLOCKD_API_TOKEN, when the sidecar has one",
        }
    },
    # The local token is optional: required only when UNLOCKD_API_TOKEN is set.
    security=[{}, {"localToken": []}],
)
