"""What the HTTP workers of `zoo serve` and the app behind them agree on, importing nothing heavy:
the header on the requests a worker passes through, a request's bearer key, and how long a checked
key stays good in any process."""

from __future__ import annotations

FRONT_HEADER = "x-zoo-front"  # set by the HTTP workers of `zoo serve` on what they pass through
KEY_TTL_S = 2.0  # a key, once checked, is not checked again for this long: a revoked one stops within it


def bearer_key(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value."""
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None
