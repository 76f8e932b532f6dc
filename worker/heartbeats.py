"""Worker heartbeats: which worker processes are alive, for ``bgswap health`` and /readyz.

Every worker process's watchdog (worker/watchdog.py) writes ``host/pid`` with the time
into one sorted set each sweep, and removes it when the process stops. A heartbeat is
fresh while it is younger than three sweeps (at least 30 s): a process that stopped
writing is stuck, cut off from Redis, or gone without saying so. Entries older than a
day are dropped as they are written, so the set does not grow with every pod ever run.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import redis

from worker import metrics

KEY = "bgswap:workers"
FORGET_S = 86_400.0


def member() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


def fresh_s(interval_s: float) -> float:
    """How old a heartbeat may be and still count: three sweeps, at least 30 s."""
    return max(30.0, 3 * interval_s)


def beat(client: redis.Redis, now: float) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.zadd(KEY, {member(): now})
    pipe.zremrangebyscore(KEY, "-inf", now - FORGET_S)
    pipe.execute()
    metrics.heartbeat_written(now)


def stopped(client: redis.Redis) -> None:
    client.zrem(KEY, member())


@dataclass(frozen=True)
class Heartbeat:
    host: str
    pid: int
    age_s: float


def read(client: redis.Redis, now: float) -> list[Heartbeat]:
    """Every recorded heartbeat, youngest first."""
    found = []
    entries: Any = client.zrevrange(KEY, 0, -1, withscores=True)
    for raw, score in entries:
        host, _, pid = (raw.decode() if isinstance(raw, bytes) else str(raw)).rpartition("/")
        found.append(Heartbeat(host, int(pid) if pid.isdigit() else 0, max(0.0, now - score)))
    return found
