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


def poll_delay(polls: int, initial_s: float, max_s: float, factor: float = 1.5) -> float:
    """``initial_s`` first, then growing by ``factor`` up to ``max_s`` (about 1 s -> 10 s):
    quick for fast generations, gentle on the API for the slow ones."""
    return float(min(max_s, initial_s * factor ** max(0, polls)))


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
) -> Wait:
    """Count a poll that found the work unfinished and say when to look again.

    Past ``timeout_s`` since the submission it raises a retryable timeout: the provider
    id stays in memory, so the next attempt polls the same request instead of paying for
    a new one. A canceled batch stops the wait.
    """
    stop_if_canceled(ctx, what)
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
    return Wait(poll_delay(polls, initial_s, max_s))
