"""One small tree of domain errors; the service maps each class to one HTTP status in one place."""

import errno


class ZooError(Exception):
    """Base of every error the service reports to a user."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after  # seconds: the answer carries ``Retry-After``

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class Unauthorized(ZooError):
    """No API key, or one that is unknown, revoked or expired."""

    status = 401
    title = "Unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="zoo"'}


class Forbidden(ZooError):
    """A valid key that may not do this: an admin's route, a quota reached, a path it only reads."""

    status = 403
    title = "Forbidden"


class TooManyRequests(ZooError):
    """Over a rate limit: the answer carries ``Retry-After``."""

    status = 429
    title = "Too many requests"


class NotFound(ZooError):
    status = 404
    title = "Not found"


class Conflict(ZooError):
    status = 409
    title = "Conflict"


class InvalidInput(ZooError):
    """Well-formed request whose content is wrong: bad spec, bad tensor, unknown base..."""

    status = 422
    title = "Invalid input"


class BadRequest(ZooError):
    """Malformed request body or upload: not JSON, not a zip, truncated bundle..."""

    status = 400
    title = "Bad request"


class PayloadTooLarge(ZooError):
    status = 413
    title = "Payload too large"


class Unavailable(ZooError):
    status = 503
    title = "Service unavailable"


class DatabaseUnreachable(Unavailable):
    """The database cannot be reached for a moment (a restart, a stop): what its driver's connection
    errors are to a client (503, ``Retry-After``) and to the job runner (an outage to wait out)."""


class Overloaded(Unavailable):
    """Too much work is waiting for the device: the answer carries ``Retry-After``."""

    title = "Overloaded"

    def __init__(self, detail: str, retry_after: int | None = 1):
        super().__init__(detail, retry_after)


class InsufficientStorage(ZooError):
    """The disk (or the database's) is full: what was sent was not stored, and nothing of it is left."""

    status = 507
    title = "Insufficient storage"


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def storage_full(e: BaseException, what: str = "the upload") -> InsufficientStorage | None:
    """The InsufficientStorage that an ``OSError`` of a full disk (or quota) is; None for any other error."""
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return InsufficientStorage(
            f"the server's storage is full: {what} was not stored; try again once space has been freed"
        )
    return None


class IntegrityError(ZooError):
    """Stored data does not match its digest (a base file changed on disk, say)."""

    status = 500
    title = "Integrity check failed"
