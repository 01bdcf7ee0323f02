"""GET /openapi.json of the sidecar: it covers every route, and the live server keeps to it."""

from __future__ import annotations

import httpx
import pytest
from schemathesis.specs.openapi.checks import negative_data_rejection

from openapi_support import SCHEMATHESIS_SETTINGS, assert_routes_documented, schema_of
from unlockd.openapi import SIDECAR_DOCUMENT
from unlockd.routes import routes


def test_openapi_sidecar_document_covers_every_route():
    """Every route of the sidecar is in its document, and nothing else is."""
    assert_routes_documented(SIDECAR_DOCUMENT, routes)


def test_openapi_sidecar_served_is_the_document(shared):
    """GET /openapi.json answers the OpenAPI 3.1 document as JSON."""
    response = httpx.get(f"{shared.url}/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == SIDECAR_DOCUMENT
    assert response.json()["openapi"].startswith("3.1")


@pytest.fixture(scope="module")
def sidecar(shared):
    """The module's sidecar, logged in, with one resource, so downloads reach the hub."""
    with shared.client() as client:
        shared.login(client)
        shared.upload(client, "known.bin", b"k" * 5000)
    return shared


schema = schema_of(SIDECAR_DOCUMENT)


@schema.parametrize()
@SCHEMATHESIS_SETTINGS
def test_openapi_sidecar_schemathesis_no_5xx_no_schema_violation(case, sidecar):
    """Generated requests to every operation: no 5xx, and every response fits the document."""
    body = case.body if isinstance(case.body, dict) else {}
    if case.operation.path == "/load/{filename}" and "filename" in body:
        # The one rule JSON Schema cannot say: a body filename equals the path's (else 422).
        body["filename"] = case.path_parameters["filename"]
    excluded = []
    if case.media_type == "multipart/form-data":
        # Form fields are text: a "negative" null or integer arrives as a valid string.
        excluded.append(negative_data_rejection)
    case.call_and_validate(base_url=sidecar.url, excluded_checks=excluded)
