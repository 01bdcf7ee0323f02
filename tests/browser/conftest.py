"""Fixtures of the operator page's tests: one Chromium per session, a page per test, live stacks.

The browser is Debian's ``chromium`` driven by Playwright (``playwright install`` downloads
browsers, which this project cannot rely on). Without one the tests are skipped, unless
``UNLOCKD_REQUIRE_BROWSER=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from servers import serve
from unlockd.app import create_app
from unlockd.config import Settings

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from playwright.sync_api import Browser, ConsoleMessage, Page

    from harness import Hub


def _chromium() -> str:
    path = os.environ.get("UNLOCKD_CHROMIUM") or shutil.which("chromium")
    if path is None:
        reason = "no chromium (apt-get install chromium, or set UNLOCKD_CHROMIUM)"
        if os.environ.get("UNLOCKD_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module's tests (all of them: there is one module).

    Not session-scoped: Playwright's sync API marks an event loop as running in this thread
    until it stops, and the async tests of later directories need the thread free.
    """
    executable = _chromium()
    from playwright.sync_api import sync_playwright  # noqa: PLC0415 - only when a test needs it

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go: $UNLOCKD_TEST_ARTIFACTS, else build/test-artifacts (git ignores it)."""
    default = Path(__file__).parents[2] / "build" / "test-artifacts"
    path = Path(os.environ.get("UNLOCKD_TEST_ARTIFACTS") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab (own cookies and sessionStorage) that fails the test on any script error.

    A Content-Security-Policy violation is a console error too, so this also checks that the
    page loads nothing it did not mean to.
    """
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    context.set_default_timeout(20_000)
    tab = context.new_page()
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(message.text)

    tab.on("console", on_console)
    tab.on("pageerror", lambda error: problems.append(str(error)))
    try:
        yield tab
    finally:
        context.close()
    # Expected HTTP errors (a 401 the page handles) are logged by Chromium as failed loads.
    unexpected = [p for p in problems if "Failed to load resource" not in p]
    assert unexpected == [], unexpected


@pytest.fixture
def sidecar(
    tmp_path: Path, shared_hub: Hub
) -> Callable[..., contextlib.AbstractContextManager[str]]:
    """``with sidecar(**settings) as url``: a sidecar of this test's own, on the session's hub."""

    @contextlib.contextmanager
    def start(**overrides: Any) -> Iterator[str]:
        overrides.setdefault("cache_dir", tmp_path / "cache")
        settings = Settings.from_environ({}, upstream_url=shared_hub.url, **overrides)
        with serve(create_app(settings)) as url:
            yield url

    return start
