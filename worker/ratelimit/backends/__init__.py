"""Storage for the rate limits, one module per backend, same semantics in each.

- ``redis``: shared by every process on every machine; what the workers use.
  ``RedisRateLimiter(client)``, ``RedisSemaphore(client)``, ``RedisCircuitBreaker(client)``
  with a ``redis.asyncio.Redis`` client.
- ``memory``: one process only, with an injectable clock; for tests and a
  one-process run. ``MemoryRateLimiter(now=time.monotonic)`` and so on.

The modules are imported by their full name so that using the memory backend
never imports redis.
"""
