"""Fixtures of the fleet tests: a fresh PostgreSQL database and S3 bucket per test.

The servers are real: PostgreSQL and Ceph's radosgw, started once per run by
``eval "$(.ci/fleet start)"`` (CI does it). Without them these tests skip, unless
``UNLOCKD_REQUIRE_FLEET=1`` makes that a failure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from botocore.config import Config
from botocore.session import get_session

from harness import ACCOUNTS, Hub
from servers import serve
from unlockd.hub import HubSettings, create_hub_app
from unlockd.hub.accounts import save_user
from unlockd.hub.auth import hash_password

if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractContextManager
    from pathlib import Path

_VARIABLES = ("UNLOCKD_TEST_DATABASE", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")


@dataclasses.dataclass
class Fleet:
    """One test's database and bucket, and how to start hubs on them."""

    database: str
    bucket: str
    environ: dict[str, str]
    s3: Any
    data_dir: Path

    @property
    def blobs(self) -> str:
        return f"s3://{self.bucket}/hub"

    def settings(self, **overrides: Any) -> HubSettings:
        return HubSettings(self.data_dir, database=self.database, blobs=self.blobs, **overrides)

    def hub(
        self, *, environ: dict[str, str] | None = None, **overrides: Any
    ) -> AbstractContextManager[str]:
        """Serve a hub on this fleet's database and bucket (under uvicorn, in a thread).

        ``environ`` adds to or replaces the fleet's variables (another ``AWS_ENDPOINT_URL``).
        """
        app = create_hub_app(
            self.settings(**overrides), environ={**self.environ, **(environ or {})}
        )
        return serve(app)

    def objects(self) -> list[str]:
        """Every object key in the bucket."""
        listing = self.s3.list_objects_v2(Bucket=self.bucket)
        return sorted(item["Key"] for item in listing.get("Contents", []))

    def multipart_uploads(self) -> list[str]:
        """The keys of the bucket's incomplete multipart uploads."""
        listing = self.s3.list_multipart_uploads(Bucket=self.bucket)
        return sorted(item["Key"] for item in listing.get("Uploads", []))


@pytest.fixture(scope="session")
def fleet_environ() -> dict[str, str]:
    """The variables of the running PostgreSQL and radosgw, or a skip (a failure in CI)."""
    missing = [name for name in _VARIABLES if not os.environ.get(name)]
    if missing:
        reason = f"no PostgreSQL + S3 store ({', '.join(missing)} unset): eval $(.ci/fleet start)"
        if os.environ.get("UNLOCKD_REQUIRE_FLEET") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return {
        name: os.environ[name]
        for name in (
            "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
            "UNLOCKD_TEST_DATABASE",
        )
        if name in os.environ
    }


@pytest.fixture(scope="session")
def s3_client(fleet_environ):
    """A botocore S3 client of the test store (to create buckets and look inside them)."""
    client = get_session().create_client(
        "s3",
        endpoint_url=fleet_environ["AWS_ENDPOINT_URL"],
        region_name=fleet_environ.get("AWS_REGION", "us-east-1"),
        aws_access_key_id=fleet_environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=fleet_environ["AWS_SECRET_ACCESS_KEY"],
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    yield client
    client.close()


async def _create_database(admin_url: str, name: str) -> str:
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def fleet(fleet_environ, s3_client, tmp_path) -> Fleet:
    """A fresh database (with the test accounts) and a fresh bucket of this test's own."""
    suffix = secrets.token_hex(6)
    database = asyncio.run(_create_database(fleet_environ["UNLOCKD_TEST_DATABASE"], f"t{suffix}"))
    bucket = f"t-{suffix}"
    s3_client.create_bucket(Bucket=bucket)
    for (email, password), role in ACCOUNTS.items():
        save_user(database, email, hash_password(password, n=2**10), role)
    return Fleet(database, bucket, fleet_environ, s3_client, tmp_path / "unused")


@pytest.fixture
def fleet_hub(fleet) -> Iterator[Hub]:
    """One hub on the test's fleet storage."""
    with fleet.hub() as url:
        yield Hub(url, fleet.data_dir)
