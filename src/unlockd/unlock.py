"""The unlock workflow: log in, fetch the archive key, decrypt the archive straight into Docker."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import stat
from typing import TYPE_CHECKING, Any

import anyio

from unlockd.crypto_stream import SEGMENT_SIZE, decrypt_stream
from unlockd.errors import (
    CiphertextError,
    ConflictError,
    CredentialsRejectedError,
    ForbiddenError,
    NotFoundError,
    StorageError,
    UnlockdError,
)
from unlockd.models import UnlockState

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from anyio.abc import TaskGroup

    from unlockd.api_client import ApiClient
    from unlockd.docker import DockerLoader
    from unlockd.metrics import Metrics

__all__ = ["UnlockManager"]

logger = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class UnlockManager:
    """One device's unlock state machine; at most one run at a time."""

    def __init__(  # noqa: PLR0913 - the run's collaborators, keyword-only
        self,
        task_group: TaskGroup,
        *,
        archive: Path | None,
        key_id: str,
        api: ApiClient,
        docker: DockerLoader,
        metrics: Metrics | None = None,
    ) -> None:
        self.archive = archive
        self.key_id = key_id
        self._api = api
        self._docker = docker
        self._metrics = metrics
        self._task_group = task_group  # owned by the app's lifespan, which outlives every run
        self._lock = anyio.Lock()
        self._state = UnlockState.IDLE
        self._error: str | None = None
        self._bytes_done = 0
        self._bytes_total = 0
        self._images: list[str] = []
        self._started_at: str | None = None
        self._finished_at: str | None = None

    @property
    def state(self) -> UnlockState:
        return self._state

    async def start(self, email: str, password: str) -> dict[str, Any]:
        """Start a run in the background; NotFoundError without archive, ConflictError if busy."""
        async with self._lock:
            # Check and transition in one critical section: exactly one caller wins.
            archive, size = await self._find_archive()
            if self._state.running:
                msg = f"an unlock is already in progress (state {self._state.value})"
                raise ConflictError(msg)
            self._error = None
            self._bytes_done = 0
            self._bytes_total = size
            self._images = []
            self._started_at = _now()
            self._finished_at = None
            self._set_state(UnlockState.AUTHENTICATING)
            self._task_group.start_soon(self._run, archive, email, password, name="unlock")
        return {"state": UnlockState.AUTHENTICATING.value}

    async def _find_archive(self) -> tuple[Path, int]:
        if self.archive is not None:
            with contextlib.suppress(OSError):
                info = await anyio.Path(self.archive).stat()
                if stat.S_ISREG(info.st_mode):
                    return self.archive, info.st_size
        raise NotFoundError("Encrypted archive not found")

    def status(self) -> dict[str, Any]:
        """The pollable view of the current or last run (no secrets)."""
        return {
            "state": self._state.value,
            "error": self._error,
            "progress": {"bytes_done": self._bytes_done, "bytes_total": self._bytes_total},
            "images": list(self._images),
            "started_at": self._started_at,
            "finished_at": self._finished_at,
        }

    def _set_state(self, state: UnlockState) -> None:
        self._state = state
        if self._metrics is not None:
            self._metrics.unlock_state.state(state.value)

    async def _transition(self, state: UnlockState) -> None:
        async with self._lock:
            self._set_state(state)

    async def _finish(
        self, state: UnlockState, *, error: str | None = None, images: list[str] | None = None
    ) -> None:
        # Shielded so that a cancelled run still records how it ended.
        with anyio.CancelScope(shield=True):
            async with self._lock:
                self._error = error
                self._images = images or []
                self._finished_at = _now()
                self._set_state(state)

    async def _run(self, archive: Path, email: str, password: str) -> None:
        try:
            images = await self._unlock(archive, email, password)
        except anyio.get_cancelled_exc_class():
            # Once the whole archive is sent, the engine may still commit the images.
            message = f"interrupted by shutdown (while {self._state.value})"
            await self._finish(UnlockState.ERROR, error=message)
            raise
        except UnlockdError as exc:
            message = self._describe(exc)
            logger.warning("unlock failed: %s", message)
            await self._finish(UnlockState.ERROR, error=message)
        except Exception:  # a bug must not leave the state machine stuck in a running state
            logger.exception("unlock failed unexpectedly")
            await self._finish(UnlockState.ERROR, error="internal error (see the sidecar's log)")
        else:
            logger.info("unlock done: %s", ", ".join(images) or "no images")
            await self._finish(UnlockState.READY, images=images)

    async def _unlock(self, archive: Path, email: str, password: str) -> list[str]:
        await self._api.login(email, password)
        await self._transition(UnlockState.DOWNLOADING_KEY)
        try:
            key = await self._api.get_key(self.key_id)
        except NotFoundError as exc:
            msg = f"archive key {self.key_id!r} not found at upstream"
            raise NotFoundError(msg) from exc
        await self._transition(UnlockState.DECRYPTING)
        try:
            async with await anyio.open_file(archive, "rb") as file:
                plaintext = decrypt_stream(self._read(file), key)
                return await self._docker.load(self._then_loading(plaintext))
        except OSError as exc:
            msg = f"cannot read the encrypted archive {archive}: {exc.strerror or exc}"
            raise StorageError(msg) from exc

    async def _read(self, file: anyio.AsyncFile[bytes]) -> AsyncIterator[bytes]:
        while chunk := await file.read(SEGMENT_SIZE):  # one segment's worth per read
            self._bytes_done += len(chunk)
            yield chunk

    async def _then_loading(self, plaintext: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in plaintext:
            yield chunk
        # The whole archive authenticated; Docker now unpacks and commits the images.
        await self._transition(UnlockState.LOADING_IMAGES)

    def _describe(self, exc: UnlockdError) -> str:
        # Chosen by type; other errors' messages already say what failed (the ApiClient's
        # name the upstream, the DockerLoader's the engine).
        if isinstance(exc, CredentialsRejectedError):
            return "invalid credentials"
        if isinstance(exc, ForbiddenError):
            return f"not allowed to read archive key {self.key_id!r}: {exc.message}"
        if isinstance(exc, CiphertextError):
            return "archive is corrupted or has been tampered with"
        return exc.message
