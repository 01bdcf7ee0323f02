"""The errors unlockd raises, one tree under :class:`UnlockdError`.

Third-party errors (httpx, aiodocker, OSError, cryptography) are translated into these at
the module that calls the library; HTTP handlers map them to status codes in one place,
through ``status_code``::

    UnlockdError                     500
    ├── InvalidInputError            422  bad name, body, multipart (here or upstream)
    │   └── InvalidKeyError          422  a key that is not base64 of 32 bytes
    ├── NotAuthenticatedError        401  no credentials / local token missing
    ├── CredentialsRejectedError     401  upstream said no to the credentials
    ├── ForbiddenError               403  the upstream role does not allow it
    ├── NotFoundError                404
    ├── ConflictError                409
    ├── PayloadTooLargeError         413
    ├── RangeNotSatisfiableError     416
    ├── UpstreamError                502  upstream unreachable or misbehaving
    │   └── InvalidUpstreamDataError 502  upstream bytes that do not decrypt or parse
    ├── StorageError                 500  a local disk or database failed (full, read-only, gone)
    ├── CiphertextError              502  (as seen by the sidecar: the data came from upstream)
    │   ├── AuthenticationFailedError     a segment did not authenticate
    │   ├── TruncatedCiphertextError      the stream ended without its last segment
    │   └── TrailingDataError             bytes follow the last segment
    └── DockerError                  502  the Docker engine is unreachable or refused
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailedError",
    "CiphertextError",
    "ConflictError",
    "CredentialsRejectedError",
    "DockerError",
    "ForbiddenError",
    "InvalidInputError",
    "InvalidKeyError",
    "InvalidUpstreamDataError",
    "NotAuthenticatedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RangeNotSatisfiableError",
    "StorageError",
    "TrailingDataError",
    "TruncatedCiphertextError",
    "UnlockdError",
    "UpstreamError",
]


class UnlockdError(Exception):
    """Root of every error unlockd raises on purpose."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInputError(UnlockdError):
    status_code = 422


class InvalidKeyError(InvalidInputError):
    pass


class NotAuthenticatedError(UnlockdError):
    status_code = 401


class CredentialsRejectedError(UnlockdError):
    status_code = 401


class ForbiddenError(UnlockdError):
    status_code = 403


class NotFoundError(UnlockdError):
    status_code = 404


class ConflictError(UnlockdError):
    status_code = 409


class PayloadTooLargeError(UnlockdError):
    status_code = 413


class RangeNotSatisfiableError(UnlockdError):
    status_code = 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class UpstreamError(UnlockdError):
    status_code = 502


class InvalidUpstreamDataError(UpstreamError):
    pass


class StorageError(UnlockdError):
    """A local file or database could not be read or written; the message says which."""


class CiphertextError(UnlockdError):
    status_code = 502


class AuthenticationFailedError(CiphertextError):
    pass


class TruncatedCiphertextError(CiphertextError):
    pass


class TrailingDataError(CiphertextError):
    pass


class DockerError(UnlockdError):
    status_code = 502
