"""AtomicFile: a file appears at its name complete, or not at all."""

from __future__ import annotations

import stat

import anyio
import pytest

from unlockd.files import AtomicFile


def test_atomic_file_block_succeeds_publishes_0600(tmp_path):
    """A block that succeeds replaces the target with the written bytes, mode 0600."""
    target = tmp_path / "out"
    target.write_bytes(b"old")
    with AtomicFile(target) as temp:
        temp.file.write(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file_block_fails_leaves_target_and_no_temp(tmp_path):
    """An exception in the block keeps the old target and removes the temp file."""
    target = tmp_path / "out"
    target.write_bytes(b"old")

    def write_then_fail() -> None:
        with AtomicFile(target) as temp:
            temp.file.write(b"partial")
            raise RuntimeError

    with pytest.raises(RuntimeError):
        write_then_fail()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file_temp_dir_and_explicit_publish(tmp_path):
    """The temp file can live in another directory; publish() inside the block is final."""
    (tmp_path / "tmp").mkdir()
    target = tmp_path / "out"
    with AtomicFile(target, temp_dir=tmp_path / "tmp", sync_dir=False) as temp:
        assert temp.path.parent == tmp_path / "tmp"
        temp.file.write(b"data")
        temp.publish()
        assert temp.published
    assert target.read_bytes() == b"data"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_atomic_file_mode_follows_umask(tmp_path):
    """A requested mode is created as open() would, less the umask."""
    target = tmp_path / "out"
    with AtomicFile(target, mode=0o666) as temp:
        temp.file.write(b"x")
    assert stat.S_IMODE(target.stat().st_mode) & 0o600 == 0o600


async def test_atomic_file_async_cancelled_removes_temp(tmp_path):
    """`async with` publishes off the loop, and a cancelled block leaves nothing behind."""
    target = tmp_path / "out"
    async with AtomicFile(target) as temp:
        temp.file.write(b"async")
    assert target.read_bytes() == b"async"
    with anyio.move_on_after(0.01):
        async with AtomicFile(tmp_path / "other") as temp:
            await anyio.sleep(1)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
