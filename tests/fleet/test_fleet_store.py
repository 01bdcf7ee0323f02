"""The store on PostgreSQL and radosgw: garbage collection beside other hubs at work, publishing."""

from __future__ import annotations

import anyio
import pytest

from unlockd.errors import NotFoundError
from unlockd.hub.blobstore import S3Blobs, S3Location
from unlockd.hub.database import Database
from unlockd.hub.store import Store

BY = "publisher@example.com"
MiB = 1024 * 1024


@pytest.fixture
async def store(fleet):
    """A store on the test's database and bucket, open."""
    blobs = S3Blobs(S3Location.parse(fleet.blobs, fleet.environ), presign_ttl=60)
    store = Store(Database(fleet.database), blobs)
    await store.open()
    yield store
    await store.close()


async def _chunks(*parts: bytes):
    for part in parts:
        yield part


def _after_snapshot(monkeypatch, store, work):
    """Run ``work()`` once garbage collection has read the references, as another hub might."""
    real = store.database.referenced_objects

    async def referenced_objects():
        found = await real()
        await work()
        return found

    monkeypatch.setattr(store.database, "referenced_objects", referenced_objects)


async def test_fleet_collect_garbage_body_written_meanwhile_kept(fleet, store, monkeypatch):
    """A body that another hub completes while the collector reads the rows is not deleted."""
    upload_id = ""

    async def upload():
        nonlocal upload_id
        upload_id = await store.create_upload(BY)
        await store.write_upload(upload_id, BY, _chunks(b"just arrived"))

    _after_snapshot(monkeypatch, store, upload)
    await store.collect_garbage(0)
    monkeypatch.undo()
    await store.publish("models", "m.bin", upload_id, key=bytes(32), small=b"s", by=BY)
    resource = await store.get_resource("models", "m.bin")
    assert f"hub/{resource.object}" in fleet.objects()


async def test_fleet_collect_garbage_multipart_begun_meanwhile_kept(fleet, store, monkeypatch):
    """A multipart upload that another hub begins while the collector reads the rows lives on."""
    go_on = anyio.Event()
    upload_id = ""

    async def body():
        for _ in range(10):  # more than a part: the multipart upload begins
            yield b"b" * MiB
        await go_on.wait()
        yield b"end"

    async with anyio.create_task_group() as group:

        async def receive():
            result = await store.write_upload(upload_id, BY, body())
            assert result.size == 10 * MiB + 3

        async def begin():
            nonlocal upload_id
            upload_id = await store.create_upload(BY)
            group.start_soon(receive)
            with anyio.fail_after(30):
                while not fleet.multipart_uploads():  # noqa: ASYNC110 - the bucket signals nothing
                    await anyio.sleep(0.05)

        _after_snapshot(monkeypatch, store, begin)
        await store.collect_garbage(0)
        monkeypatch.undo()
        go_on.set()
    assert fleet.multipart_uploads() == []
    await store.publish("models", "m.bin", upload_id, key=bytes(32), small=b"s", by=BY)
    resource = await store.get_resource("models", "m.bin")
    assert f"hub/{resource.object}" in fleet.objects()


async def test_fleet_collect_garbage_young_leftovers_kept_until_grace(fleet, store):
    """An object or multipart upload no row refers to is removed only once older than grace."""
    orphan = "uploads/AAAAAAAAAAAAAAAAAAAAAA.0"
    await store.blobs.write_empty(orphan)
    fleet.s3.create_multipart_upload(Bucket=fleet.bucket, Key=f"hub/{orphan}1")
    assert await store.collect_garbage(3600) == 0
    assert (fleet.objects(), fleet.multipart_uploads()) == ([f"hub/{orphan}"], [f"hub/{orphan}1"])
    await anyio.sleep(1)  # the store's times have whole seconds
    assert await store.collect_garbage(0) == 2
    assert (fleet.objects(), fleet.multipart_uploads()) == ([], [])


async def test_fleet_publish_upload_whose_object_is_gone_not_found(fleet, store):
    """Publishing an upload whose object is not in the bucket fails and drops the upload."""
    upload_id = await store.create_upload(BY)
    await store.write_upload(upload_id, BY, _chunks(b"body"))
    (key,) = fleet.objects()
    fleet.s3.delete_object(Bucket=fleet.bucket, Key=key)
    with pytest.raises(NotFoundError, match="body was lost"):
        await store.publish("models", "m.bin", upload_id, key=bytes(32), small=b"s", by=BY)
    assert await store.database.upload_ids() == set()
    with pytest.raises(NotFoundError):
        await store.get_resource("models", "m.bin")
