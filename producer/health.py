"""Is the deployment healthy? ``bgswap health`` and the API's /readyz ask the same questions.

- Does Redis (the batch state) answer?
- Does the broker answer (the depth of the row queue is read on the way)?
- Which worker processes have written a heartbeat lately (worker/heartbeats.py)?

Gathering talks to the servers, each with a short timeout; the verdict is a pure function
of what was gathered and what the caller requires (a liveness probe for a worker pod
requires a fresh heartbeat from its own host; readiness of the API requires only Redis and
the broker, since rows wait in the queue for workers that are still starting).
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from producer.infra import describe
from worker.celery_app import queue_depth
from worker.heartbeats import Heartbeat, fresh_s, read
from worker.settings import Settings

TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Report:
    redis: str | None  # None: it answered; else why not, in one line
    broker: str | None
    queue_depth: int | None
    workers: list[Heartbeat] = field(default_factory=list)
    fresh_s: float = 30.0

    def fresh(self, host: str | None = None) -> list[Heartbeat]:
        return [
            w for w in self.workers if w.age_s <= self.fresh_s and (host is None or w.host == host)
        ]

    def to_dict(self, problems: list[str]) -> dict[str, Any]:
        return {
            "status": "ok" if not problems else "unhealthy",
            "problems": problems,
            "redis": "ok" if self.redis is None else self.redis,
            "broker": "ok" if self.broker is None else self.broker,
            "queue_depth": self.queue_depth,
            "fresh_after_s": self.fresh_s,
            "workers_fresh": len(self.fresh()),
            "workers": [asdict(w) | {"fresh": w.age_s <= self.fresh_s} for w in self.workers],
        }


def verdict(report: Report, *, require_workers: bool = False, host: str | None = None) -> list[str]:
    """What is wrong, in one line each; empty when healthy."""
    problems = [p for p in (report.redis, report.broker) if p is not None]
    if host is not None and report.redis is None and not report.fresh(host):
        problems.append(f"no worker process on {host} wrote a heartbeat in the last "
                        f"{report.fresh_s:.0f}s")  # fmt: skip
    elif require_workers and report.redis is None and not report.fresh():
        problems.append(f"no worker wrote a heartbeat in the last {report.fresh_s:.0f}s")
    return problems


def gather(settings: Settings, celery_app: Any) -> Report:
    redis_error, workers = _redis(settings)
    broker_error, depth = _broker(settings, celery_app)
    return Report(redis_error, broker_error, depth, workers, fresh_s(settings.watchdog_interval_s))


def this_host() -> str:
    return socket.gethostname()


def _redis(settings: Settings) -> tuple[str | None, list[Heartbeat]]:
    client = redis.Redis.from_url(
        settings.effective_redis_url, socket_connect_timeout=TIMEOUT_S, socket_timeout=TIMEOUT_S
    )
    try:
        client.ping()
        return None, read(client, time.time())
    except (OSError, redis.RedisError) as exc:
        return str(describe(exc, settings)), []
    finally:
        client.close()


def _broker(settings: Settings, celery_app: Any) -> tuple[str | None, int | None]:
    try:
        return None, queue_depth(celery_app, TIMEOUT_S)
    except Exception as exc:
        return str(describe(exc, settings, broker=True)), None
