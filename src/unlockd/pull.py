"""Pulls: background fetches of a resource into the cache, every segment authenticated.

Like ``ollama pull``: ``POST /pull/{folder}/{filename}`` starts one and returns at once, a
second one joins it, ``GET`` polls its state. A pull reads the resource through the same path
as a load (the shared download of its big part, or the cache), decrypting and discarding the
plaintext, so the entry it leaves has had every segment authenticated.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import TYPE_CHECKING, Any

from unlockd.errors import NotFoundError, StorageError, UnlockdError

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from unlockd.transfers import Transfers

__all__ = ["Pull", "PullState", "Pulls"]

logger = logging.getLogger(__name__)

_REMEMBERED = 1000  # pulls whose state can still be asked for


class PullState(enum.StrEnum):
    DOWNLOADING = "downloading"  # fetching the big part, authenticating as it arrives
    VERIFYING = "verifying"  # the entry was cached already: authenticating every segment
    COMPLETE = "complete"
    ERROR = "error"

    @property
    def running(self) -> bool:
        return self in {PullState.DOWNLOADING, PullState.VERIFYING}


@dataclasses.dataclass
class Pull:
    """The progress of one pull, in plaintext bytes authenticated."""

    folder: str
    filename: str
    state: PullState = PullState.DOWNLOADING
    bytes_done: int = 0
    bytes_total: int | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The state as the API shows it."""
        body: dict[str, Any] = {
            "state": self.state.value,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
        }
        if self.detail is not None:
            body["detail"] = self.detail
        return body


class Pulls:
    """The pulls of one app; each runs in the app's task group, at most one per resource."""

    def __init__(self, transfers: Transfers, task_group: TaskGroup) -> None:
        self._transfers = transfers
        self._task_group = task_group  # owned by the app's lifespan, which outlives every pull
        self._pulls: dict[tuple[str, str], Pull] = {}

    def start(self, folder: str, filename: str) -> Pull:
        """Start pulling ``folder/filename``, or return the pull already running."""
        key = (folder, filename)
        if (pull := self._pulls.get(key)) is not None and pull.state.running:
            return pull
        pull = Pull(folder, filename)
        self._pulls.pop(key, None)
        self._pulls[key] = pull
        while len(self._pulls) > _REMEMBERED:  # the oldest finished ones go first
            oldest = next(k for k, p in self._pulls.items() if not p.state.running)
            del self._pulls[oldest]
        self._task_group.start_soon(self._run, pull, name=f"pull {folder}/{filename}")
        return pull

    def get(self, folder: str, filename: str) -> Pull:
        """The latest pull of ``folder/filename``; NotFoundError if there was none."""
        if (pull := self._pulls.get((folder, filename))) is None:
            msg = f"no pull of {folder}/{filename}"
            raise NotFoundError(msg)
        return pull

    async def _run(self, pull: Pull) -> None:
        try:
            await self._pull(pull)
        except UnlockdError as exc:
            pull.state, pull.detail = PullState.ERROR, exc.message
            logger.warning("pull of %s/%s failed: %s", pull.folder, pull.filename, exc.message)
        except Exception:
            # A bug must not leave the pull "downloading" forever.
            logger.exception("pull of %s/%s failed unexpectedly", pull.folder, pull.filename)
            pull.state, pull.detail = PullState.ERROR, "internal error (see the sidecar's log)"
        else:
            pull.state = PullState.COMPLETE
            logger.info("pull of %s/%s complete", pull.folder, pull.filename)

    async def _pull(self, pull: Pull) -> None:
        download = await self._transfers.open_download(pull.folder, pull.filename)
        try:
            pull.bytes_total = download.size
            if download.source == "cache":
                pull.state = PullState.VERIFYING
            async for chunk in download:
                pull.bytes_done += len(chunk)
        finally:
            await download.aclose()
        # Authenticated is not yet cached: the entry may still be syncing to disk, or may not
        # be kept (a read-only cache, an entry larger than the cache may hold).
        cache = self._transfers.cache
        if download.resource.big_size and not await cache.wait_cached(download.etag):
            msg = "every segment authenticated, but the cache did not keep the entry"
            raise StorageError(msg)
