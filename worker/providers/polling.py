"""Waiting on a provider without holding anything: polls are steps, spaced by a backoff.

A row whose provider is still working is not waited on by a thread or a held message:
its step returns ``Wait(seconds)`` and the worker's engine steps it again after that
long (a timer, worker/engine.py). The next step polls once more. What the wait needs
to survive a dead worker -- the provider's id for the request, how many polls so far,
when it was submitted -- is in the row's memory in Redis.
"""

from __future__ import annotations

import time
from typing import Any

from worker.errors import Codes, ProviderUnavailable, RowCanceled
from worker.providers.base import Memory, ProviderContext, Wait
from worker.providers.timing import Expected, learned_wait


def poll_delay(polls: int, initial_s: float, max_s: float, factor: float = 1.5) -> float:
    """``initial_s`` first, then growing by ``factor`` up to ``max_s`` (about 1 s -> 10 s):
    quick for fast generations, gentle on the API for the slow ones."""
    return float(min(max_s, initial_s * factor ** max(0, polls)))


# A result already there at the first poll after the submit was ready some time before
# it: counted a little earlier than that poll, so a first poll that comes too late moves
# earlier until about a tenth of the results are found on it (worker/providers/timing.py).
EARLIER = 0.9


def generated(
    ctx: ProviderContext, accepted_at: object, memory: dict[str, Any],
    unready_at: float | None = None,
) -> None:  # fmt: skip
    """A poll found the result: report how long after the provider accepted it (the
    wall-clock ``accepted_at`` in the row's memory) it was seen, and the estimate the
    poll schedule learns from: the middle between the last poll that found it unfinished
    (its step's, in memory, or a later gathered one's: ``unready_at``) and this one."""
    if not isinstance(accepted_at, int | float):
        return
    now = time.time()
    known = [t for t in (memory.get("unready_at"), unready_at) if isinstance(t, int | float)]
    unready = max(known, default=None)
    if unready is not None and unready > accepted_at:
        estimate = (unready + now) / 2 - accepted_at
    else:
        estimate = EARLIER * (now - accepted_at)
    ctx.generated(max(0.0, now - accepted_at), max(0.0, estimate))


def stop_if_canceled(ctx: ProviderContext, what: str) -> None:
    """`bgswap cancel` ran: a waiting row stops instead of polling (or paying) again."""
    if ctx.canceled():
        raise RowCanceled(f"{what}: canceled while waiting")


def next_wait(
    memory: dict[str, Any],
    store: Memory,
    ctx: ProviderContext,
    *,
    initial_s: float,
    max_s: float,
    timeout_s: float,
    what: str,
    expected: Expected | None = None,
    watch: str | None = None,
    close_s: float | None = None,
) -> Wait:
    """Count a poll that found the work unfinished and say when to look again: on the
    schedule learned from recent generations when there is one (``expected``,
    worker/providers/timing.py), else on the configured backoff.

    Past ``timeout_s`` since the submission it raises a retryable timeout: the provider
    id stays in memory, so the next attempt polls the same request instead of paying for
    a new one. A canceled batch stops the wait. ``close_s``: the provider's own interval for
    the polls after this one that the engine makes without steps (``Wait.then_s``),
    learned or not: those polls cost no step, and the provider says how close they may be.
    """
    stop_if_canceled(ctx, what)
    if "waiting_since" in memory:  # this follows a poll, not the submit
        memory["unready_at"] = time.time()
    started = float(memory.setdefault("waiting_since", time.time()))
    if time.time() - started > timeout_s:
        memory.pop("waiting_since", None)  # the next attempt gets a fresh window
        memory["polls"] = 0
        store.save(memory)
        raise ProviderUnavailable(
            Codes.PROVIDER_TIMEOUT, f"{what}: no result after {timeout_s:.0f}s"
        )
    polls = int(memory.get("polls", 0))
    memory["polls"] = polls + 1
    store.save(memory)
    backoff = poll_delay(polls, initial_s, max_s)
    if expected is None:
        # Nothing learned yet (a new deployment's first minute, a speed never used): the
        # backoff, each poll a step that may take up the schedule once there is one;
        # unless the provider names a close interval (its polls are cheap), then close
        # from the first on.
        return Wait(backoff, watch, close_s)
    # The pace of the polls after this one while they find it unfinished (``Wait.then_s``).
    after = poll_delay(polls + 1, initial_s, max_s)
    waited = time.time() - started
    wait = learned_wait(expected, waited, initial_s, max_s, backoff)
    then = learned_wait(expected, waited + wait, initial_s, max_s, after, close_s)
    return Wait(wait, watch, then)
