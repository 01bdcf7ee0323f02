"""The hub's OpenAPI 3.1 document: the upstream protocol of SPEC.md §5 and §10."""

from __future__ import annotations

from typing import Any

from unlockd.openapi import (
    BYTES_HEADERS,
    EXTRA_FIELDS,
    HEALTH,
    OCTETS,
    OPENAPI,
    RANGE_HEADERS,
    RANGE_PARAMETERS,
    UNSATISFIABLE,
    binary_response,
    document,
    error_response,
    json_body,
    json_response,
    name_parameter,
    operation,
    ref,
)

__all__ = ["HUB_DOCUMENT"]

_READER = [{"bearer": ["reader"]}]
_PUBLISHER = [{"bearer": ["publisher"]}]
_AUTH = {
    "401": "No token, or an expired or unknown one",
    "403": "The account's role does not allow it",
}
_FOLDER = name_parameter("folder", "Folder of the resource")
_NAME = name_parameter("name", "Name of the resource")
_KEY_ID = name_parameter("key_id", "Id of an archive key")
_UPLOAD_ID = {
    "name": "upload_id",
    "in": "path",
    "required": True,
    "description": "An id from POST /uploads, usable only by the account that created it",
    "schema": {"type": "string"},
}
_ETAG = {
    "name": "etag",
    "in": "path",
    "required": True,
    "description": "The etag of a published version",
    "schema": {"type": "string"},
}
_BASE64 = {
    "type": "string",
    "contentEncoding": "base64",
    "pattern": "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$",
}
_KEY = {"type": "string", "pattern": "^[A-Za-z0-9+/]{43}=$", "description": "Base64 of 32 bytes"}
_COUNT = {"type": "integer", "minimum": 0}
_JSON_ERRORS = {"413": "JSON body too large", "422": "Invalid body or name"}

_SCHEMAS = {
    "Login": {
        "type": "object",
        **EXTRA_FIELDS,
        "required": ["email", "password"],
        "properties": {
            "email": {"type": "string", "minLength": 1, "maxLength": 254},
            "password": {"type": "string", "minLength": 1, "maxLength": 1024, "format": "password"},
        },
    },
    "Token": {
        "type": "object",
        "required": ["token", "expires_in"],
        "properties": {
            "token": {"type": "string"},
            "token_type": {"const": "bearer"},
            "expires_in": {"type": "integer", "description": "Seconds the token stays valid"},
            "role": {"enum": ["reader", "publisher"]},
        },
    },
    "Resource": {
        "type": "object",
        "required": ["key", "small", "big_size", "etag", "big_url"],
        "properties": {
            "key": _KEY,
            "small": {**_BASE64, "description": "The first bytes of the ciphertext"},
            "big_size": {**_COUNT, "description": "Bytes of the big part, the rest"},
            "etag": {"type": "string"},
            "big_url": {
                "type": "string",
                "description": "The big part: relative to the hub, or an absolute presigned URL",
            },
        },
    },
    "Publish": {
        "type": "object",
        **EXTRA_FIELDS,
        "required": ["upload_id", "key", "small"],
        "properties": {
            "upload_id": {"type": "string", "minLength": 1, "maxLength": 64},
            "key": _KEY,
            "small": {**_BASE64, "minLength": 4},
        },
    },
    "Published": {
        "type": "object",
        "required": ["etag"],
        "properties": {"etag": {"type": "string"}, "big_url": {"type": "string"}},
    },
    "Upload": {
        "type": "object",
        "required": ["upload_id"],
        "properties": {"upload_id": {"type": "string"}},
    },
    "Uploaded": {
        "type": "object",
        "required": ["size", "sha256"],
        "properties": {"size": _COUNT, "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
    },
    "Key": {"type": "object", **EXTRA_FIELDS, "required": ["key"], "properties": {"key": _KEY}},
    "KeyId": {"type": "object", "required": ["key_id"], "properties": {"key_id": ref("Name")}},
}

_REDIRECT = {
    "description": "On an S3 store: the object at a presigned URL (SPEC.md §10)",
    "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
}
_NO_CONTENT = {"description": "Done"}

_PATHS: dict[str, dict[str, Any]] = {
    "/openapi.json": {"get": {**OPENAPI, "security": []}},
    "/health": {"get": HEALTH},
    "/auth/login": {
        "post": operation(
            "login",
            "A bearer token for an account",
            {"200": json_response("A token", ref("Token"))},
            body=json_body(ref("Login")),
            security=[],
            errors={"401": "Invalid email or password", **_JSON_ERRORS},
        )
    },
    "/resources/{folder}/{name}": {
        "get": operation(
            "getResource",
            "The current version's key, small part and big part location",
            {"200": json_response("The resource", ref("Resource"))},
            parameters=[_FOLDER, _NAME],
            security=_READER,
            errors={**_AUTH, "404": "No such resource", "422": "Invalid name"},
        ),
        "put": operation(
            "publishResource",
            "Publish an upload as the new version, atomically",
            {"201": json_response("Published", ref("Published"))},
            parameters=[_FOLDER, _NAME],
            body=json_body(ref("Publish")),
            security=_PUBLISHER,
            errors={
                **_AUTH,
                **_JSON_ERRORS,
                "404": "No such upload (for this account)",
                "409": "The upload has no body yet, or was published already",
            },
        ),
        "delete": operation(
            "deleteResource",
            "Remove a resource",
            {"204": _NO_CONTENT},
            parameters=[_FOLDER, _NAME],
            security=_PUBLISHER,
            errors={**_AUTH, "404": "No such resource", "422": "Invalid name"},
        ),
    },
    "/uploads": {
        "post": operation(
            "createUpload",
            "Start an upload",
            {"201": json_response("Created", ref("Upload"))},
            security=_PUBLISHER,
            errors=_AUTH,
        )
    },
    "/uploads/{upload_id}": {
        "put": operation(
            "putUpload",
            "The upload's body, streamed (a repeated PUT replaces it)",
            {"200": json_response("Stored", ref("Uploaded"))},
            parameters=[_UPLOAD_ID],
            body={
                "required": True,
                "content": {OCTETS: {"schema": {"type": "string"}}},
            },
            security=_PUBLISHER,
            errors={
                **_AUTH,
                "400": "The body was cut off",
                "404": "No such upload (for this account)",
                "409": "Published already",
            },
        ),
        "delete": operation(
            "deleteUpload",
            "Abandon an unpublished upload; its data is removed at once",
            {"204": _NO_CONTENT},
            parameters=[_UPLOAD_ID],
            security=_PUBLISHER,
            errors={**_AUTH, "404": "No such upload (for this account)"},
        ),
    },
    "/blobs/{etag}": {
        "get": operation(
            "getBlob",
            "A big part, immutable: the CDN origin",
            {
                "200": binary_response("The blob", BYTES_HEADERS),
                "206": binary_response("The range of the blob", RANGE_HEADERS),
                "307": _REDIRECT,
                "404": error_response("No such blob"),
                "416": UNSATISFIABLE,
            },
            parameters=[_ETAG, *RANGE_PARAMETERS],
            security=[],
        ),
        "head": operation(
            "headBlob",
            "The headers of GET, without the body",
            {
                "200": binary_response("The blob", BYTES_HEADERS, body=False),
                "206": binary_response("The range", RANGE_HEADERS, body=False),
                "307": _REDIRECT,
                "404": {"description": "No such blob"},
                "416": {"description": "No byte of the range exists"},
            },
            parameters=[_ETAG, *RANGE_PARAMETERS],
            security=[],
        ),
    },
    "/keys/{key_id}": {
        "put": operation(
            "putKey",
            "Register an archive key",
            {
                "200": json_response("Replaced", ref("KeyId")),
                "201": json_response("Registered", ref("KeyId")),
            },
            parameters=[_KEY_ID],
            body=json_body(ref("Key")),
            security=_PUBLISHER,
            errors={**_AUTH, **_JSON_ERRORS},
        ),
        "get": operation(
            "getKey",
            "An archive key",
            {"200": json_response("The key", ref("Key"))},
            parameters=[_KEY_ID],
            security=_READER,
            errors={**_AUTH, "404": "No such key", "422": "Invalid key id"},
        ),
    },
}

HUB_DOCUMENT = document(
    "unlockd hub",
    "The reference upstream of the unlockd sidecar: accounts, resources, uploads, blobs, keys.",
    _PATHS,
    schemas=_SCHEMAS,
    security_schemes={
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A token from POST /auth/login; scopes name the role needed",
        }
    },
    security=[{"bearer": []}],
)
