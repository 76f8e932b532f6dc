"""Signatures on webhooks, both ways (pure: no clock, no I/O).

bgswap's own header, on inbound generic hooks and on completion callbacks:

    X-Bgswap-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">

A receiver refuses a ``t`` more than ``tolerance_s`` (300 s) away from its clock, and
accepts a header with several ``v1=`` entries if any one matches (a sender rotating its
secret signs with both). Shopify's ``X-Shopify-Hmac-Sha256`` is the base64 HMAC-SHA256
of the raw body. Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

HEADER = "X-Bgswap-Signature"
TOLERANCE_S = 300


class SignatureError(ValueError):
    """A signature that does not hold; ``reason`` is one of malformed, stale, mismatch."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _digest(secret: str | bytes, message: bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, message, hashlib.sha256).digest()


def signature(secret: str | bytes, body: bytes, t: int) -> str:
    """The hex v1 value for ``body`` signed at ``t``."""
    return _digest(secret, f"{t}.".encode() + body).hex()


def sign(secret: str | bytes, body: bytes, t: int) -> str:
    """The X-Bgswap-Signature header value for ``body`` at unix time ``t``."""
    return f"t={int(t)},v1={signature(secret, body, int(t))}"


def parse(header: str) -> tuple[int, list[str]]:
    """``(t, [v1, ...])`` of a header; SignatureError(malformed) if it is not one."""
    t: int | None = None
    v1: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not value:
            raise SignatureError("malformed", "malformed signature header: expected t=...,v1=...")
        if name == "t":
            if t is not None or not value.isdigit() or len(value) > 12:
                raise SignatureError("malformed", "malformed signature header: bad t")
            t = int(value)
        elif name == "v1":
            v1.append(value.lower())
        # other schemes (v0, v2...) are ignored, as a newer sender may add them
    if t is None or not v1:
        raise SignatureError("malformed", "malformed signature header: needs t= and v1=")
    return t, v1


def verify(
    secret: str | bytes,
    header: str | None,
    body: bytes,
    now: float,
    tolerance_s: float = TOLERANCE_S,
) -> int:
    """Check an X-Bgswap-Signature header over the raw ``body``; returns its ``t``.

    Raises SignatureError: ``malformed`` (absent or unparseable), ``stale`` (t more than
    ``tolerance_s`` from ``now``, either way) or ``mismatch`` (no v1 entry matches)."""
    if not header:
        raise SignatureError("malformed", f"missing {HEADER} header")
    t, candidates = parse(header)
    if abs(now - t) > tolerance_s:
        raise SignatureError(
            "stale", f"signature timestamp is {abs(now - t):.0f}s from now (over {tolerance_s:g}s)"
        )
    expected = signature(secret, body, t).encode()
    # Compare against every entry (no early exit on the first match's position).
    ok = False
    for candidate in candidates:
        ok |= hmac.compare_digest(expected, candidate.encode())
    if not ok:
        raise SignatureError("mismatch", "signature does not match")
    return t


def shopify_hmac(secret: str | bytes, body: bytes) -> str:
    """Shopify's X-Shopify-Hmac-Sha256 value for ``body``."""
    return base64.b64encode(_digest(secret, body)).decode()


def verify_shopify(secret: str | bytes, body: bytes, header_b64: str | None) -> None:
    """Check Shopify's X-Shopify-Hmac-Sha256 over the raw body; SignatureError if not."""
    if not header_b64:
        raise SignatureError("malformed", "missing X-Shopify-Hmac-Sha256 header")
    expected = shopify_hmac(secret, body).encode()
    if not hmac.compare_digest(expected, header_b64.strip().encode()):
        raise SignatureError("mismatch", "Shopify HMAC does not match")
