"""What the OpenAPI tests of the sidecar and the hub share: route coverage and schemathesis."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import schemathesis
from hypothesis import HealthCheck, Phase, settings

if TYPE_CHECKING:
    from collections.abc import Iterable

    from starlette.routing import BaseRoute

_METHODS = {"get", "put", "post", "delete", "head", "patch", "options"}

# Bounded and repeatable for CI: 30 cases per operation, always the same ones, no deadline (a
# first scrypt or a cold cache may be slow, which is not what these tests look for).
# UNLOCKD_SCHEMATHESIS_EXAMPLES=500 explores further, with fresh random cases each run.
_EXAMPLES = os.environ.get("UNLOCKD_SCHEMATHESIS_EXAMPLES")
SCHEMATHESIS_SETTINGS = settings(
    max_examples=int(_EXAMPLES or 30),
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.target],
    suppress_health_check=list(HealthCheck),
    derandomize=_EXAMPLES is None,
    database=None,
)


def routed(routes: Iterable[BaseRoute]) -> set[tuple[str, str]]:
    """(path, method) of every route, with the HEAD that Starlette adds to every GET."""
    pairs = set()
    for route in routes:
        methods: set[str] = getattr(route, "methods", None) or set()
        for method in methods:
            pairs.add((route.path, method.lower()))  # type: ignore[attr-defined]
    return pairs


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    """(path, method) of every operation of an OpenAPI document."""
    return {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in _METHODS
    }


def assert_routes_documented(document: dict[str, Any], routes: Iterable[BaseRoute]) -> None:
    """Every route is documented and every operation is routed (HEAD of a GET is optional)."""
    by_route = routed(routes)
    by_document = documented(document)
    undocumented = {
        (path, method)
        for path, method in by_route - by_document
        if not (method == "head" and (path, "get") in by_route)
    }
    unrouted = by_document - by_route
    assert not undocumented, f"routes missing from the document: {sorted(undocumented)}"
    assert not unrouted, f"documented but not routed: {sorted(unrouted)}"


def schema_of(document: dict[str, Any]) -> schemathesis.BaseSchema:
    """A schemathesis schema of ``document`` (the served one: a test compares them)."""
    schema = schemathesis.openapi.from_dict(document)
    # Bodies are documented without extra fields, which the servers accept and ignore: a
    # request with one is not "invalid data" to be rejected.
    schema.config.generation.update(allow_extra_parameters=False)
    return schema
