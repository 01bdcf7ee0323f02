"""The cache directory's files: names in xattrs, in-use locks, superseded versions, room."""

from __future__ import annotations

import os

from unlockd.cachedir import CacheDirectory, hold_shared


def _entry(cache: CacheDirectory, etag: str, size: int, name: tuple[str, str] | None) -> None:
    path = cache.entry_path(etag)
    path.write_bytes(b"x" * size)
    if name is not None:
        cache.write_meta(path, etag, *name, cached=True)


def test_cachedir_sweep_keeps_entries_without_names(tmp_path):
    """Entries with no recorded name (older caches, no xattrs) are not one another's versions."""
    cache = CacheDirectory(tmp_path)
    for etag in ("a", "b", "c"):
        _entry(cache, etag, 10, None)
    assert cache.sweep() == []
    assert cache.remove_superseded("", "", "a") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_cachedir_remove_superseded_only_other_versions_of_that_name(tmp_path):
    """After a new version is cached, older versions of its name go; other names stay."""
    cache = CacheDirectory(tmp_path)
    _entry(cache, "old", 10, ("models", "m.bin"))
    _entry(cache, "new", 10, ("models", "m.bin"))
    _entry(cache, "other", 10, ("models", "o.bin"))
    removed = cache.remove_superseded("models", "m.bin", "new")
    assert [e.etag for e in removed] == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "other"]


def test_cachedir_entry_in_use_is_never_removed(tmp_path):
    """An entry a reader holds stays through removal, superseding and sweeping."""
    cache = CacheDirectory(tmp_path)
    _entry(cache, "old", 10, ("models", "m.bin"))
    _entry(cache, "new", 10, ("models", "m.bin"))
    fd = os.open(cache.entry_path("old"), os.O_RDONLY)
    try:
        assert hold_shared(fd)
        assert cache.remove("old") is False
        assert cache.remove_superseded("models", "m.bin", "new") == []
        assert [e.etag for e in cache.sweep(max_bytes=0) or []] == ["new"]
    finally:
        os.close(fd)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert cache.remove("old") is True


def test_cachedir_sweep_that_cannot_make_room_removes_nothing(tmp_path):
    """When even an empty cache could not hold the reserve, nothing is evicted for it."""
    cache = CacheDirectory(tmp_path)
    _entry(cache, "a", 100, ("models", "a.bin"))
    assert cache.sweep(max_bytes=150, reserve=200) is None
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert [e.etag for e in cache.sweep(max_bytes=150, reserve=100) or []] == ["a"]


def test_cachedir_lists_names_sizes_and_downloads(tmp_path):
    """entries() names complete entries and downloads in progress (temp files) alike."""
    cache = CacheDirectory(tmp_path)
    _entry(cache, "done", 7, ("models", "a.bin"))
    temp = tmp_path / ".part.0123.tmp"
    temp.write_bytes(b"12")
    cache.write_meta(temp, "part", "models", "b.bin", cached=False)
    (tmp_path / ".probe-x.tmp").write_bytes(b"")  # no name: not listed
    entries = {e.etag: e for e in cache.entries()}
    assert set(entries) == {"done", "part"}
    assert (entries["done"].size, entries["done"].complete) == (7, True)
    assert (entries["part"].filename, entries["part"].complete) == ("b.bin", False)
