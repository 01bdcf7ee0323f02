"""The operator page (GET /) in a real Chromium, against live hubs, sidecars and Docker."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import anyio
import httpx
import pytest
from playwright.sync_api import Page, expect

from harness import PUBLISHER, READER
from unlock.support import seal_archive
from unlockd.demo import build_image_archive
from unlockd.routes import routes

_ROUTED = {(route.path, method) for route in routes for method in getattr(route, "methods", ())}
needs_pull = pytest.mark.skipif(
    ("/pull/{folder}/{filename}", "POST") not in _ROUTED,
    reason="POST/GET /pull/{folder}/{filename} (SPEC §12) is not implemented yet",
)
needs_cache = pytest.mark.skipif(
    ("/cache", "GET") not in _ROUTED or ("/cache/{folder}/{filename}", "DELETE") not in _ROUTED,
    reason="GET /cache and DELETE /cache/{folder}/{filename} (SPEC §12) are not implemented yet",
)


def _section(page: Page, name: str):
    return page.get_by_role("region", name=name)


def _log_in(page: Page, account=PUBLISHER) -> None:
    form = page.get_by_role("form", name="Log in")
    form.get_by_label("Email").fill(account.email)
    form.get_by_label("Password").fill(account.password)
    form.get_by_role("button", name="Log in").click()
    expect(page.get_by_text(f"Logged in as {account.email}")).to_be_visible()


def _api_login(url: str, account=PUBLISHER) -> None:
    httpx.post(f"{url}/login", json=account.body).raise_for_status()


def _api_upload(url: str, name: str, data: bytes) -> None:
    reply = httpx.post(f"{url}/upload/{name}", files={"data": (name, data)}, timeout=60)
    assert reply.status_code == 200, reply.text


def test_page_load_shows_readiness_login_state_and_idle_unlock(page, sidecar):
    """The page shows Ready, Not logged in and an idle unlock, with no script or CSP error."""
    with sidecar() as url:
        page.goto(url)
        expect(page.get_by_role("status").filter(has_text="Ready").first).to_be_visible()
        expect(_section(page, "Upstream login").get_by_text("Not logged in")).to_be_visible()
        expect(_section(page, "Unlock").get_by_text("idle")).to_be_visible()
        expect(page.get_by_role("progressbar", name="Unlock progress")).to_be_visible()
        expect(page.get_by_role("form", name="Pull").get_by_label("Folder")).to_have_value("models")


def test_page_upstream_down_shows_not_ready_with_reason(page, tmp_path):
    """A sidecar whose upstream does not answer is shown Not ready, with the reason."""
    from servers import serve  # noqa: PLC0415
    from unlockd.app import create_app  # noqa: PLC0415
    from unlockd.config import Settings  # noqa: PLC0415

    settings = Settings.from_environ(
        {}, upstream_url="http://127.0.0.1:9", cache_dir=tmp_path / "cache"
    )
    with serve(create_app(settings)) as url:
        page.goto(url)
        expect(page.locator("#readiness")).to_have_text("Not ready")
        expect(page.get_by_role("listitem").filter(has_text="upstream")).to_be_visible()


def test_page_login_valid_credentials_shows_logged_in(page, sidecar):
    """Logging in through the form shows the account and clears the password field."""
    with sidecar() as url:
        page.goto(url)
        _log_in(page)
        form = page.get_by_role("form", name="Log in")
        expect(form.get_by_label("Password")).to_have_value("")
        assert httpx.get(f"{url}/status").json()["authenticated"] is True


def test_page_login_wrong_password_says_rejected(page, sidecar):
    """A wrong password is reported as rejected by the upstream, and nobody is logged in."""
    with sidecar() as url:
        page.goto(url)
        form = page.get_by_role("form", name="Log in")
        form.get_by_label("Email").fill(PUBLISHER.email)
        form.get_by_label("Password").fill("not-the-password")
        form.get_by_role("button", name="Log in").click()
        expect(form.get_by_text("The upstream rejected these credentials.")).to_be_visible()
        assert httpx.get(f"{url}/status").json()["authenticated"] is False


def test_page_api_token_asked_once_kept_in_session_storage(page, sidecar):
    """With UNLOCKD_API_TOKEN the page asks once; a wrong token is refused; a reload keeps it."""
    with sidecar(api_token="local-secret") as url:
        page.goto(url)
        token_input = page.get_by_label("API token")
        token_input.fill("wrong")
        page.get_by_role("button", name="Continue").click()
        expect(page.get_by_text("That token was not accepted.")).to_be_visible()
        token_input.fill("local-secret")
        page.get_by_role("button", name="Continue").click()
        expect(page.locator("#readiness")).to_have_text("Ready")
        expect(token_input).to_be_hidden()
        stored = page.evaluate("sessionStorage.getItem('unlockd.apiToken')")
        assert stored == "local-secret"
        page.reload()
        expect(page.locator("#readiness")).to_have_text("Ready")
        expect(page.get_by_label("API token")).to_be_hidden()
        _log_in(page)


def test_page_phone_width_no_horizontal_scroll(browser, sidecar):
    """On a 360 px wide phone screen the page fits its width: nothing scrolls sideways."""
    context = browser.new_context(viewport={"width": 360, "height": 780}, is_mobile=True)
    try:
        tab = context.new_page()
        with sidecar() as url:
            tab.goto(url)
            expect(tab.locator("#readiness")).to_have_text("Ready")
            width = tab.evaluate("document.documentElement.scrollWidth")
            assert width <= 360
    finally:
        context.close()


def test_page_upload_file_published_and_loadable(page, sidecar, tmp_path):
    """A file uploaded through the page is published: /load gives back the same bytes."""
    data = os.urandom(300_000)
    source = tmp_path / "page-upload.bin"
    source.write_bytes(data)
    with sidecar() as url:
        _api_login(url)
        page.goto(url)
        form = page.get_by_role("form", name="Upload")
        form.get_by_label("File").set_input_files(source)
        form.get_by_role("button", name="Upload").click()
        expect(form.get_by_text("Uploaded models/page-upload.bin")).to_be_visible()
        loaded = httpx.post(f"{url}/load/page-upload.bin", timeout=60)
        assert loaded.content == data


@pytest.mark.docker
def test_page_unlock_real_engine_ready_with_image(  # noqa: PLR0917 - fixtures
    page, sidecar, engine, docker_host, shared_hub, artifacts, tmp_path
):
    """Unlocking through the page loads the image: state ready, full bar, the tag listed."""
    tag = engine.new_tag()
    archive = build_image_archive({tag: {"hello.txt": b"unlocked through the page\n"}})
    sealed = tmp_path / "images.enc"
    # A key id of this test's own: the session's hub is shared.
    key_id = f"images-{tag.rsplit('/', 1)[0].rsplit('-', 1)[-1]}"
    # Playwright's sync API holds an event loop in this thread: seal in another.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(anyio.run, seal_archive, shared_hub.url, sealed, archive, key_id).result()
    with sidecar(archive=sealed, archive_key_id=key_id, docker_host=docker_host) as url:
        page.goto(url)
        _log_in(page)
        form = page.get_by_role("form", name="Unlock")
        form.get_by_label("Email").fill(READER.email)
        form.get_by_label("Password").fill(READER.password)
        form.get_by_role("button", name="Unlock").click()
        unlock = _section(page, "Unlock")
        expect(unlock.locator("#unlock-state")).to_have_text("ready", timeout=60_000)
        expect(unlock.get_by_role("listitem").filter(has_text=tag)).to_be_visible()
        bar = page.get_by_role("progressbar", name="Unlock progress")
        size = sealed.stat().st_size
        expect(bar).to_have_attribute("max", str(size))
        expect(bar).to_have_attribute("value", str(size))
        page.screenshot(path=artifacts / "operator-page.png", full_page=True)
    assert engine.tags() == {tag}


@needs_pull
@needs_cache
def test_page_pull_progress_reaches_end_then_listed(page, sidecar):
    """A pull started from the page shows a bar that fills, then the entry in the cache list."""
    with sidecar() as url:
        _api_login(url)
        _api_upload(url, "pulled.bin", os.urandom(3 << 20))
        page.goto(url)
        form = page.get_by_role("form", name="Pull")
        expect(form.get_by_label("Folder")).to_have_value("models")
        form.get_by_label("Filename").fill("pulled.bin")
        form.get_by_role("button", name="Pull").click()
        bar = page.get_by_role("progressbar", name="Pull models/pulled.bin")
        expect(bar).to_be_visible()
        expect(page.get_by_role("listitem").filter(has_text="complete")).to_be_visible()
        assert bar.get_attribute("value") == bar.get_attribute("max")
        cached = page.locator("#cache-list").get_by_role("listitem")
        expect(cached.filter(has_text="models/pulled.bin")).to_be_visible()


@needs_cache
def test_page_cache_entry_listed_with_size_then_removed(page, sidecar):
    """A cached entry is listed with its size; Remove drops it from the page and the cache."""
    with sidecar() as url:
        _api_login(url)
        _api_upload(url, "cached.bin", os.urandom(2 << 20))
        httpx.post(f"{url}/load/cached.bin", timeout=60).raise_for_status()
        page.goto(url)
        entry = page.locator("#cache-list").get_by_role("listitem").filter(has_text="cached.bin")
        expect(entry).to_contain_text("MiB")
        page.get_by_role("button", name="Remove models/cached.bin").click()
        expect(entry).to_have_count(0)
        listed = httpx.get(f"{url}/cache").json()
        entries = listed if isinstance(listed, list) else listed["entries"]
        assert all(e["filename"] != "cached.bin" for e in entries)
