"""The one small interface every provider implements, and the values it trades in."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import SecretStr

from worker.jobs import Job, JobSpec, ProviderCaps
from worker.limits import Deferred, RowLimits
from worker.providers.timing import Expected
from worker.settings import Settings
from worker.storage import Storage, StoredObject


@dataclass(frozen=True)
class OutputImage:
    """One result. ``stored`` is set when the provider already put it at its destination
    (Runware's uploadEndpoint); the pipeline then uploads nothing and ``data`` is empty."""

    data: bytes
    content_type: str
    extension: str
    width: int | None
    height: int | None
    seed: int | None = None
    nsfw: bool | None = None
    stored: StoredObject | None = None


@dataclass(frozen=True)
class Wait:
    """Not done yet: deliver this row again in ``seconds`` (see worker/providers/polling.py).

    ``watch`` names what the next step will poll (a Runware taskUUID, a fal status URL)
    when the provider can look several up at once (``Prefetching``): the engine then asks
    for all the rows that are due in one go, off the step threads, and the step reads the
    answer it was given instead of waiting for a round trip of its own.

    ``then_s``: how often to look again while such a gathered poll finds the work plainly
    unfinished (the provider's close pace, worker/providers/polling.py; none when a
    completion webhook is the signal). The engine polls on at that pace without a step
    (no thread, no Redis write), up to ``worker.engine.STEP_EVERY_S`` between steps."""

    seconds: float
    watch: str | None = None
    then_s: float | None = None


@dataclass(frozen=True)
class ProviderResult:
    outputs: list[OutputImage]
    cost_usd: float = 0.0
    provider_task_id: str | None = None


class Fetcher(Protocol):
    def __call__(self, ref: str, field: str) -> bytes:
        """Bytes of an image reference from the manifest (URL, s3://, data:, local path).

        ``field`` names the manifest column, for error messages.
        """
        ...


class Memory(Protocol):
    """Per-row provider state that outlives the worker process (task ids, uploads).

    Saved BEFORE a paid request is sent: a redelivered job finds it and resumes
    instead of paying again.
    """

    def load(self) -> dict[str, Any]: ...

    def save(self, memory: dict[str, Any]) -> None: ...


@dataclass
class DictMemory:
    """In-process memory, for tests and one-off calls."""

    value: dict[str, Any] = field(default_factory=dict)

    def load(self) -> dict[str, Any]:
        return dict(self.value)

    def save(self, memory: dict[str, Any]) -> None:
        self.value = dict(memory)


@dataclass(frozen=True)
class ProviderContext:
    """What a provider may use besides the job: resources scoped to the worker."""

    fetch: Fetcher
    max_image_pixels: int
    memory: Memory = field(default_factory=DictMemory)
    # Bytes one image may take while it is worked on (None: no limit besides the pixels).
    image_budget: int | None = None
    storage: Storage | None = None
    sleep: Callable[[float], None] = time.sleep
    canceled: Callable[[], bool] = lambda: False
    # The provider account's global limits (worker/limits.py); None: unlimited.
    limits: RowLimits | None = None
    # Raises when this worker may not act on the row now (worker/hold.py): called right
    # before a paid request goes out, after its intent was saved in ``memory``.
    guard: Callable[[], None] = lambda: None
    # What this provider's recent generations took (worker/providers/timing.py; None:
    # too few known), and where a polled-for result's times are reported: seconds from
    # acceptance to the result seen, and the estimate of when it was ready.
    expected: Expected | None = None
    generated: Callable[[float, float], None] = lambda seen, estimate: None
    # The row's completion webhook URL, to name in its submit (worker/completions.py);
    # None: the webhooks are off. A row that asked for one polls on the backoff only.
    webhook: str | None = None


class Provider(Protocol):
    name: str
    model: str
    # True when a step is computation in this process (the worker runs such steps on a
    # pool of one thread per core), False when it is network round trips.
    cpu_bound: bool

    def estimate_cost(self, spec: JobSpec) -> float:
        """USD this row will cost, for `validate` and `--max-cost`; 0 for free providers."""
        ...

    def step(self, job: Job, ctx: ProviderContext) -> ProviderResult | Wait | Deferred:
        """Advance one row by one short step (a submit, or one poll): its results, how
        long to wait before the next step, or (``Deferred``, from ``ctx.limits``) how long
        until the account's limits may let its paid request go. Raises a
        worker.errors.BgswapError."""
        ...


@dataclass(frozen=True)
class Account:
    """A paid provider's account, as the one Settings object configures it."""

    key_variable: str  # the environment variable its key comes from (README)
    key: Callable[[Settings], SecretStr | None]
    rate: Callable[[Settings], str | None]  # BGSWAP_<NAME>_RATE, e.g. "20/s"
    max_in_flight: Callable[[Settings], int | None]  # BGSWAP_<NAME>_MAX_IN_FLIGHT


@dataclass(frozen=True)
class ProviderSpec:
    """All bgswap knows of a provider besides its code, declared in its own module (README:
    Adding a provider)."""

    name: str
    caps: ProviderCaps  # what validation lets through to it (worker/jobs.py)
    make: Callable[[Settings], Provider]
    # None: free (no key, no limits); else the account its limits are kept per.
    account: Account | None = None
    # Whether it can call a completion webhook (worker/completions.py).
    webhooks: bool = False


@runtime_checkable
class Prefetching(Protocol):
    """A provider whose polls the engine can gather (worker/engine.py): ``prefetch`` asks
    about every watched wait that is due, in as few requests as the provider allows, and
    keeps each answer for the row's next step, which uses it instead of a request.

    It returns the watches whose answer says only "not yet": their rows need no step to
    learn that, and the engine polls them again (``Wait.then_s``); those answers are kept
    too, for a row the engine steps anyway."""

    def prefetch(self, watches: Sequence[str]) -> Collection[str]: ...


def run_to_completion(provider: Provider, job: Job, ctx: ProviderContext) -> ProviderResult:
    """Step a row until it is done, sleeping between steps (tests, one-off calls: the
    worker never sleeps, its engine sets a timer instead)."""
    while True:
        outcome = provider.step(job, ctx)
        if isinstance(outcome, ProviderResult):
            return outcome
        ctx.sleep(outcome.wait_s if isinstance(outcome, Deferred) else outcome.seconds)
