"""One small tree of domain errors; the service maps each class to one HTTP status in one place."""


class ZooError(Exception):
    """Base of every error the service reports to a user."""

    status = 500
    title = "Internal error"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


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


class Overloaded(Unavailable):
    """Too much work is waiting for the device: the answer carries ``Retry-After``."""

    title = "Overloaded"

    def __init__(self, detail: str, retry_after: int = 1):
        super().__init__(detail)
        self.retry_after = retry_after


class IntegrityError(ZooError):
    """Stored data does not match its digest (a base file changed on disk, say)."""

    status = 500
    title = "Integrity check failed"
