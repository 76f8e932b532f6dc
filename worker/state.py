"""Batch state in Redis: the single source of truth for rows, states and counters.

Keys (the ``{batch}`` hash tag keeps one batch on one Redis Cluster slot, so the
Lua scripts below may touch all of them atomically):

    bgswap:{B}:meta      hash  total, status, provider, output, created_at, cost_usd, ...
    bgswap:{B}:jobs      hash  index -> Job JSON (or the record of a rejected row)
    bgswap:{B}:state     hash  index -> queued | running | succeeded | failed | canceled | skipped
    bgswap:{B}:result    hash  index -> terminal result JSON (written once)
    bgswap:{B}:attempts  hash  index -> deliveries started
    bgswap:{B}:started   hash  index -> first start time
    bgswap:{B}:counts    hash  state -> number of rows in it
    bgswap:{B}:provider  hash  index -> the provider's own ids for the row (task UUID, ...)
    bgswap:{B}:halt      hash  provider -> why it was stopped for this batch (auth, credit)
    bgswap:batches       zset  batch id by creation time
    bgswap:due           zset  "batch|index" of every non-terminal row -> when it is overdue

Batch status: submitting -> open -> finalizing -> done. Completion is counted, not
chorded: the transition that makes ``terminal == total`` on an open batch flips it
to ``finalizing`` exactly once and tells its caller to write the output manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis

TERMINAL_STATES = ("succeeded", "failed", "canceled", "skipped")
ALL_STATES = ("queued", "running", *TERMINAL_STATES)


class StartVerdict(StrEnum):
    RUN = "run"
    ALREADY_TERMINAL = "terminal"


class FinishVerdict(StrEnum):
    RECORDED = "recorded"
    BATCH_COMPLETE = "complete"  # this call made the batch complete: finalize it
    ALREADY_TERMINAL = "terminal"


# KEYS: state, counts, attempts, started; ARGV: index, now
_START = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur == false then return {'missing', 0} end
if cur == 'succeeded' or cur == 'failed' or cur == 'canceled' or cur == 'skipped' then
  return {'terminal', tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')}
end
if cur ~= 'running' then
  redis.call('HSET', KEYS[1], ARGV[1], 'running')
  redis.call('HINCRBY', KEYS[2], cur, -1)
  redis.call('HINCRBY', KEYS[2], 'running', 1)
end
redis.call('HSETNX', KEYS[4], ARGV[1], ARGV[2])
return {'run', redis.call('HINCRBY', KEYS[3], ARGV[1], 1)}
"""

# KEYS: state, counts, result, meta; ARGV: index, new state, result json, cost, allowed from...
_FINISH = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur == false then return 'missing' end
local allowed = false
for i = 5, #ARGV do if ARGV[i] == cur then allowed = true end end
if not allowed then return 'terminal' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[2], cur, -1)
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
if tonumber(ARGV[4]) ~= 0 then redis.call('HINCRBYFLOAT', KEYS[4], 'cost_usd', ARGV[4]) end
local c = redis.call('HMGET', KEYS[2], 'succeeded', 'failed', 'canceled', 'skipped')
local done = 0
for _, v in ipairs(c) do done = done + tonumber(v or '0') end
local meta = redis.call('HMGET', KEYS[4], 'status', 'total')
if meta[1] == 'open' and done >= tonumber(meta[2]) then
  redis.call('HSET', KEYS[4], 'status', 'finalizing')
  return 'complete'
end
return 'recorded'
"""

# KEYS: counts, meta; ARGV: total. Seals a batch whose rows are all registered.
_SEAL = """
redis.call('HSET', KEYS[2], 'total', ARGV[1], 'status', 'open')
local c = redis.call('HMGET', KEYS[1], 'succeeded', 'failed', 'canceled', 'skipped')
local done = 0
for _, v in ipairs(c) do done = done + tonumber(v or '0') end
if done >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[2], 'status', 'finalizing')
  return 1
end
return 0
"""

# KEYS: state, counts, result, meta, attempts, started, provider; ARGV: index. Failed -> queued.
_REQUEUE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'failed' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'queued')
redis.call('HINCRBY', KEYS[2], 'failed', -1)
redis.call('HINCRBY', KEYS[2], 'queued', 1)
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
redis.call('HSET', KEYS[4], 'status', 'open')
redis.call('HDEL', KEYS[4], 'manifest_url', 'finished_at')
return 1
"""


# KEYS: due; ARGV: now, grace, limit. Overdue rows, each pushed `grace` later so that
# one watchdog (of many) takes it.
_CLAIM_OVERDUE = """
local rows = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, row in ipairs(rows) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), row)
end
return rows
"""

DUE_KEY = "bgswap:due"

# KEYS: state, counts; ARGV: index. A running row whose retry is scheduled.
_RELEASE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'queued')
redis.call('HINCRBY', KEYS[2], 'running', -1)
redis.call('HINCRBY', KEYS[2], 'queued', 1)
return 1
"""


def _key(batch_id: str, part: str) -> str:
    return f"bgswap:{{{batch_id}}}:{part}"


@dataclass(frozen=True)
class StartResult:
    verdict: StartVerdict
    attempts: int


@dataclass(frozen=True)
class RowRecord:
    """Everything stored about one row, for building its output manifest line."""

    index: int
    job: dict[str, Any]
    state: str
    result: dict[str, Any] | None
    attempts: int


class BatchNotFound(LookupError):
    pass


class BatchStore:
    def __init__(self, client: redis.Redis) -> None:
        # redis-py types every reply as bytes | str whatever decode_responses says;
        # this client decodes, and the methods below state the real types.
        self.redis: Any = client
        self._start = client.register_script(_START)
        self._finish = client.register_script(_FINISH)
        self._seal = client.register_script(_SEAL)
        self._requeue = client.register_script(_REQUEUE)
        self._release = client.register_script(_RELEASE)
        self._claim_overdue = client.register_script(_CLAIM_OVERDUE)

    @classmethod
    def from_url(cls, url: str) -> BatchStore:
        return cls(redis.Redis.from_url(url, decode_responses=True))

    # -- batch lifecycle -------------------------------------------------

    def create(self, batch_id: str, meta: dict[str, str], created_ts: float) -> bool:
        """Register a new batch; False when the id is taken."""
        key = _key(batch_id, "meta")
        if not self.redis.hsetnx(key, "status", "submitting"):
            return False
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, mapping={**meta, "cost_usd": "0"})
        pipe.hset(_key(batch_id, "counts"), mapping=dict.fromkeys(ALL_STATES, 0))
        pipe.zadd("bgswap:batches", {batch_id: created_ts})
        pipe.execute()
        return True

    # -- the watchdog's view: when each live row must be seen again --------------------

    def expect(self, batch_id: str, index: int, within_s: float, now: float) -> None:
        """The row's next delivery is due before now + within_s, or it is lost."""
        self.redis.zadd(DUE_KEY, {f"{batch_id}|{index}": now + within_s})

    def expect_many(
        self, batch_id: str, indices: Sequence[int], within_s: float, now: float
    ) -> None:
        if indices:
            self.redis.zadd(DUE_KEY, {f"{batch_id}|{i}": now + within_s for i in indices})

    def forget(self, batch_id: str, index: int) -> None:
        self.redis.zrem(DUE_KEY, f"{batch_id}|{index}")

    def claim_overdue(self, now: float, grace_s: float, limit: int = 500) -> list[tuple[str, int]]:
        rows: list[str] = self._claim_overdue(keys=[DUE_KEY], args=[now, grace_s, limit])
        claimed = []
        for row in rows:
            batch_id, _, index = row.rpartition("|")
            claimed.append((batch_id, int(index)))
        return claimed

    def add_rows(self, batch_id: str, rows: Sequence[tuple[int, str, str, str | None]]) -> None:
        """Register rows ``(index, job json, state, result json)`` of a batch being submitted."""
        pipe = self.redis.pipeline(transaction=False)
        per_state: dict[str, int] = {}
        jobs = {str(i): job for i, job, _, _ in rows}
        states = {str(i): state for i, _, state, _ in rows}
        results = {str(i): res for i, _, _, res in rows if res is not None}
        for _, _, state, _ in rows:
            per_state[state] = per_state.get(state, 0) + 1
        if jobs:
            pipe.hset(_key(batch_id, "jobs"), mapping=jobs)
            pipe.hset(_key(batch_id, "state"), mapping=states)
        if results:
            pipe.hset(_key(batch_id, "result"), mapping=results)
        for state, n in per_state.items():
            pipe.hincrby(_key(batch_id, "counts"), state, n)
        pipe.execute()

    def seal(self, batch_id: str, total: int) -> bool:
        """All rows are registered; True when the batch is already complete."""
        keys = [_key(batch_id, "counts"), _key(batch_id, "meta")]
        return bool(self._seal(keys=keys, args=[total]))

    def meta(self, batch_id: str) -> dict[str, str]:
        meta: dict[str, str] = self.redis.hgetall(_key(batch_id, "meta"))
        if not meta:
            raise BatchNotFound(batch_id)
        return meta

    def set_meta(self, batch_id: str, **fields: str) -> None:
        self.redis.hset(_key(batch_id, "meta"), mapping=fields)

    def counts(self, batch_id: str) -> dict[str, int]:
        raw: dict[str, str] = self.redis.hgetall(_key(batch_id, "counts"))
        return {state: int(raw.get(state, 0)) for state in ALL_STATES}

    def batch_ids(self, limit: int = 20) -> list[str]:
        ids: list[str] = self.redis.zrevrange("bgswap:batches", 0, limit - 1)
        return ids

    # -- rows --------------------------------------------------------------

    def job(self, batch_id: str, index: int) -> str | None:
        value: str | None = self.redis.hget(_key(batch_id, "jobs"), str(index))
        return value

    def start(self, batch_id: str, index: int, now: str) -> StartResult:
        keys = [_key(batch_id, p) for p in ("state", "counts", "attempts", "started")]
        verdict, attempts = self._start(keys=keys, args=[index, now])
        if verdict == "missing":
            raise BatchNotFound(f"{batch_id} row {index}")
        return StartResult(StartVerdict(verdict), int(attempts))

    def started_at(self, batch_id: str, index: int) -> str | None:
        value: str | None = self.redis.hget(_key(batch_id, "started"), str(index))
        return value

    def finish(
        self,
        batch_id: str,
        index: int,
        state: str,
        result: dict[str, Any],
        *,
        cost_usd: float = 0.0,
        allowed_from: Sequence[str] = ("queued", "running"),
    ) -> FinishVerdict:
        """Record a row's terminal state once; later calls for the same row are no-ops."""
        keys = [_key(batch_id, p) for p in ("state", "counts", "result", "meta")]
        args: list[str | int] = [index, state, json.dumps(result), repr(cost_usd), *allowed_from]
        verdict = self._finish(keys=keys, args=args)
        if verdict == "missing":
            raise BatchNotFound(f"{batch_id} row {index}")
        return FinishVerdict(verdict)

    def release(self, batch_id: str, index: int) -> None:
        """A retry is scheduled: the row is queued again (not terminal, not running)."""
        self._release(keys=[_key(batch_id, "state"), _key(batch_id, "counts")], args=[index])

    def provider_memory(self, batch_id: str, index: int) -> dict[str, Any] | None:
        """What the provider saved for this row (its task id...), surviving worker deaths."""
        raw = self.redis.hget(_key(batch_id, "provider"), str(index))
        return json.loads(raw) if raw else None

    def save_provider_memory(self, batch_id: str, index: int, memory: dict[str, Any]) -> None:
        self.redis.hset(_key(batch_id, "provider"), str(index), json.dumps(memory))

    def is_canceled(self, batch_id: str) -> bool:
        return bool(self.redis.hget(_key(batch_id, "meta"), "canceled"))

    def provider_memories(self, batch_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for field, raw in self.redis.hscan_iter(_key(batch_id, "provider")):
            yield int(field), json.loads(raw)

    def halt(self, batch_id: str, provider: str, reason: str) -> None:
        """Stop a provider for the rest of the batch; the first reason is kept."""
        self.redis.hsetnx(_key(batch_id, "halt"), provider, reason)

    def halted(self, batch_id: str, provider: str) -> str | None:
        reason: str | None = self.redis.hget(_key(batch_id, "halt"), provider)
        return reason

    def halts(self, batch_id: str) -> dict[str, str]:
        halts: dict[str, str] = self.redis.hgetall(_key(batch_id, "halt"))
        return halts

    def defer(self, batch_id: str, index: int) -> None:
        """Put a running row back without counting the delivery as an attempt (it waits
        for a rate token or an in-flight slot: nothing was tried)."""
        self.release(batch_id, index)
        self.redis.hincrby(_key(batch_id, "attempts"), str(index), -1)

    def requeue_failed(self, batch_id: str, index: int) -> bool:
        parts = ("state", "counts", "result", "meta", "attempts", "started", "provider")
        return bool(self._requeue(keys=[_key(batch_id, p) for p in parts], args=[index]))

    def indices_in_state(self, batch_id: str, state: str) -> Iterator[int]:
        for field, value in self.redis.hscan_iter(_key(batch_id, "state")):
            if value == state:
                yield int(field)

    def records(self, batch_id: str, total: int, chunk: int = 500) -> Iterator[RowRecord]:
        """Every row in input order, fetched a chunk at a time (bounded memory)."""
        for lo in range(0, total, chunk):
            fields = [str(i) for i in range(lo, min(total, lo + chunk))]
            pipe = self.redis.pipeline(transaction=False)
            for part in ("jobs", "state", "result", "attempts"):
                pipe.hmget(_key(batch_id, part), fields)
            jobs, states, results, attempts = pipe.execute()
            for n, field in enumerate(fields):
                yield RowRecord(
                    index=int(field),
                    job=json.loads(jobs[n]) if jobs[n] else {},
                    state=states[n] or "missing",
                    result=json.loads(results[n]) if results[n] else None,
                    attempts=int(attempts[n] or 0),
                )
