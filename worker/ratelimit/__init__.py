"""Global rate limits shared by every worker process on every machine.

Celery's ``rate_limit`` is per worker, so a fleet of N workers would send N times a
provider's limit. The limits here live in shared storage (Redis) and are checked by
every caller, whatever process or machine it runs in.

Three pieces, each a Protocol with a Redis and an in-memory implementation
(``worker.ratelimit.backends.redis`` / ``.memory``):

- ``RateLimiter``: requests per period, with GCRA (the generic cell rate algorithm).
  GCRA keeps ONE number per key, the theoretical arrival time (TAT), so a limiter
  costs one small key with a TTL instead of a log of timestamps. It spaces requests
  evenly (no double burst at the edge of a fixed window) and it tells the caller
  exactly how long to wait, so callers sleep once instead of polling. A 429 lowers
  the rate for a while through ``slow_down``; the penalty expires by itself.
- ``Semaphore``: requests in flight (fal allows 2 to 40 per account), as leases.
  A worker killed by SIGKILL or the OOM killer never releases what it holds; with a
  lease the slot comes back by itself when its holder stops refreshing it, and an
  expired holder never counts.
- ``CircuitBreaker``: a provider that answers with a run of auth or credit errors is
  closed for everyone for a while, with the reason, instead of every worker burning
  its own attempts on it.

The algorithms are here as pure functions (``gcra``, ``compound_penalty``); the Redis
backend runs the same steps in Lua so that each decision is atomic and uses Redis's
clock, the one clock every worker shares.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = [
    "PENALTY_FLOOR",
    "CircuitBreaker",
    "GcraDecision",
    "Rate",
    "RateLimiter",
    "Semaphore",
    "check_burst",
    "check_duration",
    "check_lease",
    "compound_penalty",
    "gcra",
    "limit_key",
    "parse_rate",
]

PENALTY_FLOOR = 1 / 16
"""Repeated 429s never slow a limiter below 1/16 of its rate: it must still probe."""

_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([smh])\s*$")
_PROVIDER_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Rate:
    """``count`` requests per ``period_s`` seconds."""

    count: int
    period_s: float

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"rate count must be an int >= 1, got {self.count!r}")
        if not (math.isfinite(self.period_s) and self.period_s > 0):
            raise ValueError(f"rate period must be > 0 seconds, got {self.period_s!r}")

    @property
    def emission_interval_s(self) -> float:
        """Seconds between two requests at the steady rate."""
        return self.period_s / self.count


def parse_rate(text: str) -> Rate:
    """``"20/s"``, ``"600/m"``, ``"3600/h"``, ``"5/10s"`` (5 per 10 seconds) -> Rate."""
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(
            f"invalid rate {text!r}: expected <count>/<period> such as "
            "'20/s', '600/m', '3600/h' or '5/10s'"
        )
    count, multiple, unit = match.groups()
    return Rate(count=int(count), period_s=float(multiple or 1) * _UNIT_S[unit])


def limit_key(provider: str, api_key: str | None) -> str:
    """The limiter key for one provider account, e.g. ``runware:3f2a9c01b7de``.

    Limits are per account, so the key must tell accounts apart, but it ends up in
    Redis, logs and metrics: only a 48-bit prefix of the SHA-256 is kept, never the
    secret. A missing key gets ``nokey`` (local or keyless providers).
    """
    name = provider.strip().lower()
    if not _PROVIDER_RE.match(name):
        raise ValueError(f"invalid provider name {provider!r}: use [a-z0-9_.-], max 64 chars")
    if not api_key:
        return f"{name}:nokey"
    return f"{name}:{hashlib.sha256(api_key.encode()).hexdigest()[:12]}"


class GcraDecision(NamedTuple):
    """``wait_s == 0``: admitted, store ``tat``. Else wait that long; ``tat`` unchanged."""

    wait_s: float
    tat: float


def gcra(tat: float | None, now: float, interval_s: float, burst: int) -> GcraDecision:
    """One GCRA step. ``tat`` is the stored theoretical arrival time (None: idle).

    A request is admitted when at most ``burst`` intervals are booked ahead of now;
    admitting it books one more. A refusal books nothing, so waiting callers do not
    push each other back. The Redis backend's Lua script mirrors this function.
    """
    check_burst(burst)
    base = now if tat is None or tat < now else tat
    new_tat = base + interval_s
    allow_at = new_tat - burst * interval_s
    if allow_at > now:
        return GcraDecision(allow_at - now, base)  # refused only when tat > now: base is tat
    return GcraDecision(0.0, new_tat)


def compound_penalty(current: float, factor: float) -> float:
    """The rate multiplier after one more ``slow_down(factor)``, never below the floor."""
    if not (0 < factor <= 1):
        raise ValueError(f"slow_down factor must be in (0, 1], got {factor!r}")
    return max(current * factor, PENALTY_FLOOR)


def check_burst(burst: int) -> None:
    """Reject a burst below 1 (it would never admit anything)."""
    if burst < 1:
        raise ValueError(f"burst must be >= 1, got {burst!r}")


def check_lease(limit: int, lease_s: float) -> None:
    """Reject a semaphore call that could never hold a lease."""
    if limit < 1:
        raise ValueError(f"semaphore limit must be >= 1, got {limit!r}")
    check_duration(lease_s, "lease_s")


def check_duration(seconds: float, name: str) -> None:
    """Reject a TTL that is not a positive, finite number of seconds."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be > 0 seconds, got {seconds!r}")


class RateLimiter(Protocol):
    """Requests per period for a key, shared by every caller of the same storage."""

    async def acquire(self, key: str, rate: Rate, burst: int = 1) -> float:
        """0.0 when one request may go now (and it is counted), else the seconds to
        wait before asking again (nothing counted). Never sleeps, never spins."""
        ...

    async def slow_down(self, key: str, factor: float, for_s: float) -> None:
        """Multiply the key's effective rate by ``factor`` for ``for_s`` seconds.

        Calls while a penalty is live compound (0.5 twice is 0.25) down to
        ``PENALTY_FLOOR``, and restart the ``for_s`` countdown; then it expires.
        """
        ...


class Semaphore(Protocol):
    """At most ``limit`` live leases per key; a lease not refreshed in time is gone."""

    async def try_acquire(self, key: str, holder: str, limit: int, lease_s: float) -> bool:
        """Take (or renew, if ``holder`` already has one) a lease of ``lease_s``."""
        ...

    async def refresh(self, key: str, holder: str, lease_s: float) -> bool:
        """Extend a live lease to ``lease_s`` from now; False if it expired or is gone."""
        ...

    async def release(self, key: str, holder: str) -> bool:
        """Give the lease back; False (and nothing done) if ``holder`` had none."""
        ...

    async def in_use(self, key: str) -> int:
        """Live leases only: expired holders never count."""
        ...


class CircuitBreaker(Protocol):
    """A key is open (refusing) while a trip's TTL lasts."""

    async def trip(self, key: str, for_s: float, reason: str) -> None:
        """Open the circuit for ``for_s`` seconds; a later trip replaces the earlier."""
        ...

    async def reason(self, key: str) -> str | None:
        """Why the circuit is open, or None when it is closed."""
        ...
