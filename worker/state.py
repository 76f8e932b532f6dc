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
    bgswap:{B}:lease     hash  index -> token of the worker process holding the row
    bgswap:{B}:due       zset  index -> when that hold lapses (ms, Redis clock)
    bgswap:{B}:epoch     hash  index -> fencing token: +1 each time the row changes hands
    bgswap:{B}:fingerprint hash index -> the row's fingerprint, found by its worker before
                               a provider that may finish it in a later step (incremental)
    bgswap:batches       zset  batch id by creation time
    bgswap:live          set   batches not yet done (what the watchdog looks at)

A worker process *holds* the rows it works on (worker/engine.py): ``adopt`` gives it a
lease, its heartbeat pushes the lease on, ``finish`` or a hand-back ends it. A lapsed
lease is how a dead worker is noticed: the watchdog ``claim``s the row and re-enqueues
it, and ``adopt`` refuses a row another live process holds, so a duplicate message never
makes two processes work on one row.

Fencing. A lease says who *should* work on a row; it cannot stop a process that was
frozen (SIGSTOP, a paused VM) or cut off from Redis past its lease from acting on what
it still holds in memory. So every change of hands -- adopt, a lapsed lease claimed, a
hand-back, the terminal record, a retry -- moves the row's epoch on, and each holder
keeps the epoch ``adopt`` gave it. Every write that matters (the provider's memory, the
lease renewal before results are uploaded, the terminal record) names that epoch and is
refused, atomically in its own script, once the row has moved on: a stale holder learns
it on its first such write and drops the row (worker/hold.py).

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
from redis.backoff import NoBackoff
from redis.retry import Retry

TERMINAL_STATES = ("succeeded", "failed", "canceled", "skipped")
ALL_STATES = ("queued", "running", *TERMINAL_STATES)


class StartVerdict(StrEnum):
    RUN = "run"
    ALREADY_TERMINAL = "terminal"
    HELD = "held"  # another live worker process holds the row: leave it alone


class FinishVerdict(StrEnum):
    RECORDED = "recorded"
    BATCH_COMPLETE = "complete"  # this call made the batch complete: finalize it
    ALREADY_TERMINAL = "terminal"
    STALE = "stale"  # the caller's epoch is not the row's any more: nothing was recorded


class SaveVerdict(StrEnum):
    SAVED = "saved"
    STALE = "stale"  # the row changed hands since the caller's epoch
    CHANGED = "changed"  # the stored memory is not what the caller based its write on


# Scripts that read Redis's clock and then write are replicated by their effects (the
# default since Redis 5; asked for explicitly for a 6.2 server configured otherwise).
_NOW_MS = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: state, counts, attempts, started, lease, due, jobs, provider, epoch; ARGV: index,
# now, token, lease ms. Taking the row moves its epoch on, and returns it with everything
# working on it needs (one round trip).
_ADOPT = (
    _NOW_MS
    + """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur == false then return {'missing', 0} end
if cur == 'succeeded' or cur == 'failed' or cur == 'canceled' or cur == 'skipped' then
  return {'terminal', tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')}
end
local holder = redis.call('HGET', KEYS[5], ARGV[1])
if holder and holder ~= ARGV[3] then
  local due = redis.call('ZSCORE', KEYS[6], ARGV[1])
  if due and tonumber(due) > now then return {'held', 0} end
end
if cur ~= 'running' then
  redis.call('HSET', KEYS[1], ARGV[1], 'running')
  redis.call('HINCRBY', KEYS[2], cur, -1)
  redis.call('HINCRBY', KEYS[2], 'running', 1)
end
redis.call('HSETNX', KEYS[4], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[6], now + tonumber(ARGV[4]), ARGV[1])
local attempts = redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
local epoch = redis.call('HINCRBY', KEYS[9], ARGV[1], 1)
return {'run', attempts, redis.call('HGET', KEYS[7], ARGV[1]) or '',
        redis.call('HGET', KEYS[4], ARGV[1]), redis.call('HGET', KEYS[8], ARGV[1]) or '',
        epoch}
"""
)

# KEYS: lease, due, state; ARGV: token, lease ms, index... Pushes on the holds still ours;
# returns those (renewed) and the live rows that are not ours any more (lost: claimed by
# a watchdog, we were presumed dead). A row that just became terminal is neither.
_HEARTBEAT = (
    _NOW_MS
    + """
local renewed, lost = {}, {}
for i = 3, #ARGV do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[1] then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[i])
    table.insert(renewed, ARGV[i])
  else
    local state = redis.call('HGET', KEYS[3], ARGV[i])
    if state == 'queued' or state == 'running' then table.insert(lost, ARGV[i]) end
  end
end
return {renewed, lost}
"""
)

# KEYS: state, counts, result, meta, lease, due, epoch; ARGV: index, new state, result
# json, cost, the holder's epoch ('' for a caller that holds no row: `bgswap cancel`),
# allowed from...
_FINISH = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur == false then return 'missing' end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[7], ARGV[1]) ~= ARGV[5] then return 'stale' end
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('ZREM', KEYS[6], ARGV[1])
local allowed = false
for i = 6, #ARGV do if ARGV[i] == cur then allowed = true end end
if not allowed then return 'terminal' end
redis.call('HINCRBY', KEYS[7], ARGV[1], 1)
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

# KEYS: state, counts, result, meta, attempts, started, provider, epoch; ARGV: index.
# Failed -> queued.
_REQUEUE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'failed' then return 0 end
redis.call('HINCRBY', KEYS[8], ARGV[1], 1)
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


# KEYS: state, counts, lease, due, epoch; ARGV: limit, reclaim ms. Rows whose hold
# lapsed: the lease is dropped, the epoch moves on (the old holder is fenced off at once,
# whether it is dead or only stalled) and the row is queued again; its due time moves
# `reclaim` on, so one watchdog (of many) takes it, and again if the new message is lost.
_CLAIM = (
    _NOW_MS
    + """
local rows = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, ARGV[1])
for _, row in ipairs(rows) do
  redis.call('HDEL', KEYS[3], row)
  redis.call('HINCRBY', KEYS[5], row, 1)
  redis.call('ZADD', KEYS[4], now + tonumber(ARGV[2]), row)
  if redis.call('HGET', KEYS[1], row) == 'running' then
    redis.call('HSET', KEYS[1], row, 'queued')
    redis.call('HINCRBY', KEYS[2], 'running', -1)
    redis.call('HINCRBY', KEYS[2], 'queued', 1)
  end
end
return rows
"""
)

# KEYS: state, counts, lease, due, epoch; ARGV: index, epoch. A running row goes back to
# queued and its hold ends (a retry through the queue, or a hand-back at shutdown), if the
# caller's epoch is still the row's.
_RELEASE = """
if redis.call('HGET', KEYS[5], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], 'queued')
redis.call('HINCRBY', KEYS[2], 'running', -1)
redis.call('HINCRBY', KEYS[2], 'queued', 1)
return 1
"""

# KEYS: epoch, provider, due; ARGV: index, epoch, the memory the caller based its write on
# ('': none), the new memory, lease ms. The provider's memory of a row is written only by
# its holder, and only over what that holder last saw: a stale in-process copy can never
# overwrite it. The write also pushes the holder's lease on: it proves the hold is alive.
_SAVE = (
    _NOW_MS
    + """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 'stale' end
if (redis.call('HGET', KEYS[2], ARGV[1]) or '') ~= ARGV[3] then return 'changed' end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[5]), ARGV[1])
return 'saved'
"""
)

# KEYS: epoch, due; ARGV: index, epoch, lease ms. The holder at that epoch pushes its lease
# on; 0 when the row changed hands.
_RENEW = (
    _NOW_MS
    + """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return 1
"""
)

# KEYS: state, counts, lease, due, epoch; ARGV: index. A running row's hold ends whoever
# holds it: only for a holder known to be gone (the embedded default's previous owner).
_TAKE_BACK = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= 'running' then return 0 end
redis.call('HINCRBY', KEYS[5], ARGV[1], 1)
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], 'queued')
redis.call('HINCRBY', KEYS[2], 'running', -1)
redis.call('HINCRBY', KEYS[2], 'queued', 1)
return 1
"""

LIVE_KEY = "bgswap:live"
REDIS_TIMEOUT_S = 10.0


def _key(batch_id: str, part: str) -> str:
    return f"bgswap:{{{batch_id}}}:{part}"


@dataclass(frozen=True)
class StartResult:
    verdict: StartVerdict
    attempts: int
    job: str | None = None  # the row's Job JSON, when taken
    started_at: str | None = None
    memory: str = ""  # the provider's memory of the row, as stored ('' if none)
    epoch: int = 0  # the row's fencing token for this holder


@dataclass(frozen=True)
class Beat:
    """What one heartbeat found: the rows whose lease it pushed on, and the live rows that
    another process holds now (the others of those asked about have become terminal)."""

    renewed: frozenset[int]
    lost: frozenset[int]


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
        self._adopt = client.register_script(_ADOPT)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._finish = client.register_script(_FINISH)
        self._seal = client.register_script(_SEAL)
        self._requeue = client.register_script(_REQUEUE)
        self._release = client.register_script(_RELEASE)
        self._claim = client.register_script(_CLAIM)
        self._save = client.register_script(_SAVE)
        self._renew = client.register_script(_RENEW)
        self._take_back = client.register_script(_TAKE_BACK)

    @classmethod
    def from_url(cls, url: str) -> BatchStore:
        # A timeout on every call: a link that goes dark must not hang a worker's threads
        # for ever (its leases would lapse unnoticed). And no retries (redis-py retries a
        # command 10 times by default): one that timed out or lost its connection may
        # have run, and running a transition twice is not harmless (two epochs, a lost
        # "batch complete"). The caller's step, heartbeat or sweep tries again instead.
        return cls(
            redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=REDIS_TIMEOUT_S,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                retry=Retry(NoBackoff(), 0),
            )
        )

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
        pipe.sadd(LIVE_KEY, batch_id)
        pipe.execute()
        return True

    # -- holds: which worker process works on a row, until when ---------------------

    def heartbeat(self, batch_id: str, indices: Sequence[int], token: str, lease_s: float) -> Beat:
        """Push on this process's holds: which were renewed, which were lost to others."""
        keys = [_key(batch_id, "lease"), _key(batch_id, "due"), _key(batch_id, "state")]
        renewed, lost = self._heartbeat(keys=keys, args=[token, int(lease_s * 1000), *indices])
        return Beat(frozenset(int(i) for i in renewed), frozenset(int(i) for i in lost))

    def claim_lapsed(self, batch_id: str, reclaim_s: float, limit: int = 500) -> list[int]:
        """Rows whose hold lapsed (their worker died), queued again for re-publishing."""
        keys = [_key(batch_id, p) for p in ("state", "counts", "lease", "due", "epoch")]
        rows = self._claim(keys=keys, args=[limit, int(reclaim_s * 1000)])
        return [int(i) for i in rows]

    def live_batches(self) -> list[str]:
        batches: set[str] = self.redis.smembers(LIVE_KEY)
        return sorted(batches)

    def stalled_for(self, batch_id: str, now: float | None) -> float:
        """How long the batch has been seen with queued rows and an empty broker queue:
        ``now`` notes it (the first time is kept), None clears it."""
        key = _key(batch_id, "meta")
        if now is None:
            self.redis.hdel(key, "stalled_since")
            return 0.0
        self.redis.hsetnx(key, "stalled_since", repr(now))
        return now - float(self.redis.hget(key, "stalled_since") or now)

    def finalizing_for(self, batch_id: str, now: float | None) -> float:
        """How long the batch has been seen finalizing (0 when it is not): ``now`` notes
        the first sighting, None forgets it (the next sighting starts the count again)."""
        key = _key(batch_id, "meta")
        status, seen = self.redis.hmget(key, "status", "finalizing_seen")
        if status != "finalizing" or now is None:
            if seen is not None:
                self.redis.hdel(key, "finalizing_seen")
            return 0.0
        if seen is None:
            self.redis.hset(key, "finalizing_seen", repr(now))
            return 0.0
        return now - float(seen)

    def retire(self, batch_id: str) -> None:
        """The batch is done: the watchdog stops looking at it."""
        self.redis.srem(LIVE_KEY, batch_id)

    def pause(self, batch_id: str, when: str) -> None:
        """An interrupted batch: no watchdog touches it until it is resumed."""
        self.redis.srem(LIVE_KEY, batch_id)
        self.redis.hset(_key(batch_id, "meta"), "interrupted_at", when)

    def revive(self, batch_id: str) -> None:
        """A paused batch goes on (`bgswap resume`)."""
        self.redis.hdel(_key(batch_id, "meta"), "interrupted_at", "stalled_since")
        self.redis.sadd(LIVE_KEY, batch_id)

    def take_back(self, batch_id: str) -> int:
        """Every running row of the batch back to queued, its hold ended and its epoch
        moved on (a holder that is somehow alive is fenced off); returns how many."""
        keys = [_key(batch_id, p) for p in ("state", "counts", "lease", "due", "epoch")]
        running = list(self.indices_in_state(batch_id, "running"))
        return sum(int(self._take_back(keys=keys, args=[i])) for i in running)

    def recorded(self, batch_id: str) -> int:
        """How many rows of the batch are registered (rows 0..n-1: chunks go in order)."""
        return int(self.redis.hlen(_key(batch_id, "jobs")))

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

    def exists(self, batch_id: str) -> bool:
        return bool(self.redis.exists(_key(batch_id, "meta")))

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

    def adopt(self, batch_id: str, index: int, now: str, token: str, lease_s: float) -> StartResult:
        """Take the row for this process (``token``) for ``lease_s``: queued -> running,
        attempts + 1. A terminal row, or one another live process holds, is not taken."""
        parts = ("state", "counts", "attempts", "started", "lease", "due", "jobs", "provider",
                 "epoch")  # fmt: skip
        keys = [_key(batch_id, p) for p in parts]
        reply = self._adopt(keys=keys, args=[index, now, token, int(lease_s * 1000)])
        if reply[0] == "missing":
            raise BatchNotFound(f"{batch_id} row {index}")
        if reply[0] != "run":
            return StartResult(StartVerdict(reply[0]), int(reply[1]))
        _, attempts, job, started_at, memory, epoch = reply
        return StartResult(
            StartVerdict.RUN, int(attempts), job or None, started_at, memory, int(epoch)
        )

    def epoch(self, batch_id: str, index: int) -> int:
        """The row's fencing token now (0 before anyone took it)."""
        return int(self.redis.hget(_key(batch_id, "epoch"), str(index)) or 0)

    def renew(self, batch_id: str, index: int, epoch: int, lease_s: float) -> bool:
        """Push on the lease of the row's holder at ``epoch``; False: the row changed hands."""
        keys = [_key(batch_id, "epoch"), _key(batch_id, "due")]
        return bool(self._renew(keys=keys, args=[index, epoch, int(lease_s * 1000)]))

    def count_attempt(self, batch_id: str, index: int) -> int:
        """A held row tries again (a retry): one more attempt."""
        return int(self.redis.hincrby(_key(batch_id, "attempts"), str(index), 1))

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
        epoch: int | None = None,
        allowed_from: Sequence[str] = ("queued", "running"),
    ) -> FinishVerdict:
        """Record a row's terminal state once; later calls for the same row are no-ops.

        A holder passes its ``epoch``: once the row has changed hands, nothing is recorded
        (``STALE``). Callers that hold no row (cancel) pass None."""
        parts = ("state", "counts", "result", "meta", "lease", "due", "epoch")
        keys = [_key(batch_id, p) for p in parts]
        fence = "" if epoch is None else str(epoch)
        args: list[str | int] = [
            index, state, json.dumps(result), repr(cost_usd), fence, *allowed_from
        ]  # fmt: skip
        verdict = self._finish(keys=keys, args=args)
        if verdict == "missing":
            raise BatchNotFound(f"{batch_id} row {index}")
        return FinishVerdict(verdict)

    def release(self, batch_id: str, index: int, epoch: int) -> bool:
        """The row goes back to the queue (not terminal, not running) and its hold ends,
        if ``epoch`` is still the row's (the caller still holds it)."""
        keys = [_key(batch_id, p) for p in ("state", "counts", "lease", "due", "epoch")]
        return bool(self._release(keys=keys, args=[index, epoch]))

    def provider_memory(self, batch_id: str, index: int) -> dict[str, Any] | None:
        """What the provider saved for this row (its task id...), surviving worker deaths."""
        raw = self.raw_provider_memory(batch_id, index)
        return json.loads(raw) if raw else None

    def raw_provider_memory(self, batch_id: str, index: int) -> str:
        raw: str | None = self.redis.hget(_key(batch_id, "provider"), str(index))
        return raw or ""

    def save_provider_memory(
        self,
        batch_id: str,
        index: int,
        memory: str,
        *,
        epoch: int,
        based_on: str,
        lease_s: float,
    ) -> SaveVerdict:
        """Write the provider's memory of a row (JSON text) as its holder at ``epoch``, over
        ``based_on`` (the text that holder last read or wrote; '' for none), and push its
        lease on for ``lease_s``."""
        keys = [_key(batch_id, "epoch"), _key(batch_id, "provider"), _key(batch_id, "due")]
        args: list[str | int] = [index, epoch, based_on, memory, int(lease_s * 1000)]
        return SaveVerdict(self._save(keys=keys, args=args))

    def save_fingerprint(self, batch_id: str, index: int, fp: str) -> None:
        """Unfenced: a fingerprint is derived from the row's inputs, not a decision of its
        holder; a stale holder writing one does no harm."""
        self.redis.hset(_key(batch_id, "fingerprint"), str(index), fp)

    def fingerprint(self, batch_id: str, index: int) -> str | None:
        value: str | None = self.redis.hget(_key(batch_id, "fingerprint"), str(index))
        return value

    def is_canceled(self, batch_id: str) -> bool:
        return bool(self.redis.hget(_key(batch_id, "meta"), "canceled"))

    def provider_memories(self, batch_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for field, raw in self.redis.hscan_iter(_key(batch_id, "provider")):
            yield int(field), json.loads(raw)

    def halt(self, batch_id: str, provider: str, reason: str) -> None:
        """Stop a provider for the rest of the batch; the first reason is kept."""
        self.redis.hsetnx(_key(batch_id, "halt"), provider, reason)

    def halts(self, batch_id: str) -> dict[str, str]:
        halts: dict[str, str] = self.redis.hgetall(_key(batch_id, "halt"))
        return halts

    def uncount_attempt(self, batch_id: str, index: int) -> None:
        """The delivery was no attempt (a wait, or no rate token or slot: nothing tried)."""
        self.redis.hincrby(_key(batch_id, "attempts"), str(index), -1)

    def requeue_failed(self, batch_id: str, index: int) -> bool:
        parts = ("state", "counts", "result", "meta", "attempts", "started", "provider", "epoch")
        requeued = bool(self._requeue(keys=[_key(batch_id, p) for p in parts], args=[index]))
        if requeued:
            self.redis.sadd(LIVE_KEY, batch_id)
        return requeued

    def indices_in_state(self, batch_id: str, state: str) -> Iterator[int]:
        # COUNT 1000: Redis's default of 10 a round trip makes a big batch slow to scan.
        for field, value in self.redis.hscan_iter(_key(batch_id, "state"), count=1000):
            if value == state:
                yield int(field)

    def results(self, batch_id: str, indices: Sequence[int]) -> list[dict[str, Any] | None]:
        """The terminal results of the rows ``indices`` (None for a row without one)."""
        if not indices:
            return []
        raw = self.redis.hmget(_key(batch_id, "result"), [str(i) for i in indices])
        return [json.loads(value) if value else None for value in raw]

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
