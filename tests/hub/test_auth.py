"""Login, tokens, roles and password storage of the hub."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest

from harness import PUBLISHER, READER
from unlockd.errors import InvalidInputError, NotAuthenticatedError
from unlockd.hub import add_user
from unlockd.hub.auth import Principal, Role, TokenStore, hash_password, verify_password
from unlockd.hub.database import Database


def test_login_valid_credentials_returns_expiring_token(shared_hub, accounts):
    """A correct password yields a bearer token and its lifetime."""
    (publisher, _) = accounts
    reply = httpx.post(
        f"{shared_hub.url}/auth/login", json={"email": publisher[0], "password": publisher[1]}
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["expires_in"] == 3600
    assert len(body["token"]) >= 32


def test_login_wrong_password_and_unknown_email_look_the_same(shared_hub, accounts):
    """Both failures are 401 with the same body, so emails cannot be probed."""
    wrong = httpx.post(
        f"{shared_hub.url}/auth/login", json={"email": accounts[1][0], "password": "no"}
    )
    unknown = httpx.post(
        f"{shared_hub.url}/auth/login", json={"email": "x@y.z", "password": "nope"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json() == {"detail": "invalid email or password"}


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"[1, 2]",
        b'{"email": "a@b.c"}',
        b'{"email": "a@b.c", "password": 5}',
        b'{"email": "", "password": "x"}',
        b"\xff\xfe",
    ],
)
def test_login_bad_body_is_422(shared_hub, content):
    """Bodies that are not an object with two non-empty strings are 422 with a detail."""
    reply = httpx.post(f"{shared_hub.url}/auth/login", content=content)
    assert reply.status_code == 422
    assert "detail" in reply.json()


def test_login_oversized_body_is_413(shared_hub):
    """A JSON body over the limit is refused before it is parsed."""
    reply = httpx.post(f"{shared_hub.url}/auth/login", content=b" " * (1024 * 1024 + 1))
    assert reply.status_code == 413


@pytest.mark.parametrize(
    "authorization", [None, "Bearer", "Bearer not-a-token", "Basic dXNlcjpwdw=="]
)
def test_reader_endpoint_without_valid_token_is_401(shared_hub, authorization):
    """A missing, empty, unknown or non-bearer credential is 401 with WWW-Authenticate."""
    headers = {} if authorization is None else {"authorization": authorization}
    reply = httpx.get(f"{shared_hub.url}/keys/images", headers=headers)
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    assert "detail" in reply.json()


def test_token_after_ttl_is_401(tmp_path, start_hub, clock):
    """A token works until --token-ttl has passed on the hub's clock, and is 401 from then on."""
    with start_hub(tmp_path / "hub", clock=clock, token_ttl=60) as url:
        login = httpx.post(f"{url}/auth/login", json=READER.body)
        assert login.json()["expires_in"] == 60
        headers = {"authorization": f"Bearer {login.json()['token']}"}
        clock.advance(59.9)
        assert httpx.get(f"{url}/keys/nope", headers=headers).status_code == 404
        clock.advance(0.1)
        reply = httpx.get(f"{url}/keys/nope", headers=headers)
        assert reply.status_code == 401
        assert reply.json() == {"detail": "invalid or expired token"}


async def test_token_store_prune_after_ttl_drops_only_expired(clock, tmp_path):
    """prune() drops the tokens whose ttl has passed on the store's clock, and only those."""
    database = Database(tmp_path / "hub.sqlite3")
    await database.open()
    try:
        tokens = TokenStore(database, 60, clock=clock)
        old = await tokens.issue(Principal(READER.email, Role.READER))
        clock.advance(30)
        new = await tokens.issue(Principal(PUBLISHER.email, Role.PUBLISHER))
        clock.advance(30)
        assert await tokens.prune() == 1
        principal = await tokens.check(f"Bearer {new}")
        assert principal == Principal(PUBLISHER.email, Role.PUBLISHER)
        with pytest.raises(NotAuthenticatedError):
            await tokens.check(f"Bearer {old}")
    finally:
        await database.close()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/uploads", None),
        ("PUT", "/uploads/AAAAAAAAAAAAAAAAAAAAAA", None),
        ("DELETE", "/uploads/AAAAAAAAAAAAAAAAAAAAAA", None),
        ("PUT", "/resources/models/a.bin", {"upload_id": "x", "key": "", "small": ""}),
        ("DELETE", "/resources/models/a.bin", None),
        ("PUT", "/keys/images", {"key": "A" * 44}),
    ],
)
def test_publisher_endpoint_as_reader_is_403(shared_reader, method, path, body):
    """A reader may not upload, publish, delete or register keys."""
    reply = shared_reader.request(method, path, json=body)
    assert reply.status_code == 403
    assert reply.json() == {"detail": "this call needs the publisher role"}


def test_add_user_existing_email_updates_password_and_role(hub, accounts):
    """add_user on an existing account replaces its password and role."""
    email, old_password = accounts[1]
    add_user(hub.data_dir, email, "new-password", role="publisher")
    assert (
        httpx.post(
            f"{hub.url}/auth/login", json={"email": email, "password": old_password}
        ).status_code
        == 401
    )
    with hub.client((email, "new-password")) as client:
        assert client.post("/uploads").status_code == 201


def test_add_user_stores_only_a_scrypt_hash(hub, accounts):
    """The database holds a salted scrypt hash, never the password."""
    with sqlite3.connect(hub.data_dir / "hub.sqlite3") as db:
        rows = db.execute("SELECT email, password_hash FROM users").fetchall()
    db.close()
    assert {email for email, _ in rows} == {email for email, _ in accounts}
    for _, stored in rows:
        assert stored.startswith("scrypt$")
        assert all(password not in stored for _, password in accounts)
    assert rows[0][1] != rows[1][1]


@pytest.mark.parametrize(
    ("email", "password", "role"),
    [
        ("", "pw", "reader"),
        ("a@b.c", "", "reader"),
        ("a@b.c", "pw", "admin"),
        (" a", "p", "reader"),
    ],
)
def test_add_user_bad_input_is_refused(tmp_path, email, password, role):
    """Empty emails or passwords and unknown roles are refused."""
    with pytest.raises(InvalidInputError):
        add_user(tmp_path, email, password, role)


def test_verify_password_matches_only_the_right_password():
    """A hash verifies its own password, not another, and malformed hashes never match."""
    stored = hash_password("correct horse")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct horsE", stored)
    assert not verify_password("x", "garbage")
    assert not verify_password("x", "bcrypt$1$2$3$AA==$AA==")
    assert hash_password("same") != hash_password("same")


def test_login_reply_names_the_role(shared_hub, accounts):
    """The login reply carries the account's role (an optional protocol extension)."""
    for (email, password), role in zip(accounts, ("publisher", "reader"), strict=True):
        reply = httpx.post(
            f"{shared_hub.url}/auth/login", json={"email": email, "password": password}
        )
        assert reply.status_code == 200
        assert reply.json()["role"] == role


def test_login_burst_bounds_concurrent_password_hashing(hub, accounts, monkeypatch):
    """A burst of logins runs at most PASSWORD_HASHING_THREADS scrypt computations at once."""
    import threading  # noqa: PLC0415

    from unlockd.hub import routes  # noqa: PLC0415
    from unlockd.hub.auth import PASSWORD_HASHING_THREADS  # noqa: PLC0415

    lock = threading.Lock()
    running = peak = 0

    def counting_verify(password: str, stored: str) -> bool:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            time.sleep(0.05)  # long enough for the burst to pile up
            return verify_password(password, stored)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(routes, "verify_password", counting_verify)
    email, password = accounts[0]
    results: list[int] = []

    def login() -> None:
        reply = httpx.post(
            f"{hub.url}/auth/login", json={"email": email, "password": password}, timeout=30
        )
        results.append(reply.status_code)

    threads = [threading.Thread(target=login) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [200] * 12
    assert 1 < peak <= PASSWORD_HASHING_THREADS
