"""GET /openapi.json of the hub: it covers every route, and the live hub keeps to it."""

from __future__ import annotations

import httpx
import pytest

from harness import PUBLISHER
from openapi_support import SCHEMATHESIS_SETTINGS, assert_routes_documented, schema_of
from unlockd.hub.openapi import HUB_DOCUMENT
from unlockd.hub.routes import routes


def test_openapi_hub_document_covers_every_route():
    """Every route of the hub is in its document, and nothing else is."""
    assert_routes_documented(HUB_DOCUMENT, routes)


def test_openapi_hub_served_is_the_document(shared_hub):
    """GET /openapi.json answers the OpenAPI 3.1 document as JSON, without a token."""
    response = httpx.get(f"{shared_hub.url}/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == HUB_DOCUMENT


@pytest.fixture(scope="module")
def hub_session(tmp_path_factory, start_hub):
    """A hub of this module's own with one published resource; (url, publisher token, etag)."""
    data_dir = tmp_path_factory.mktemp("openapi") / "hub"
    with start_hub(data_dir) as url:
        token = httpx.post(f"{url}/auth/login", json=PUBLISHER.body).json()["token"]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
            upload_id = client.post("/uploads").json()["upload_id"]
            client.put(f"/uploads/{upload_id}", content=b"b" * 10_000).raise_for_status()
            body = {"upload_id": upload_id, "key": "A" * 43 + "=", "small": "c21hbGw="}
            etag = client.put("/resources/models/known.bin", json=body).json()["etag"]
        yield url, token, etag


schema = schema_of(HUB_DOCUMENT)


@schema.parametrize()
@SCHEMATHESIS_SETTINGS
def test_openapi_hub_schemathesis_no_5xx_no_schema_violation(case, hub_session):
    """Generated requests to every operation, as the publisher: no 5xx, responses fit."""
    url, token, _ = hub_session
    headers = {"Authorization": f"Bearer {token}"} if case.operation.security else {}
    case.call_and_validate(base_url=url, headers=headers)
