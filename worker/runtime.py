"""Per-process wiring: one ``WorkerContext`` holds what a worker process keeps for its whole
life (settings, the resources built from them, the engine), made at worker start."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from worker.engine import Engine
from worker.fetch import SourceFetcher
from worker.limits import BackgroundLoop, ProviderLimits, provider_limits, redis_backends
from worker.pipeline import Deps
from worker.providers import account_of
from worker.settings import Settings, get_settings
from worker.state import BatchStore
from worker.storage import Storage


class WorkerContext:
    """A worker process's settings and how it publishes (the finalizer of a batch it
    completed, a row's message), and what is built from them on first use: the
    resources (``Deps``) and the engine (worker/engine.py). Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        on_complete: Callable[[str], None] | None = None,
        republish: Callable[[str, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_complete = on_complete
        self.republish = republish
        self._lock = threading.Lock()
        self._deps: Deps | None = None
        self._engine: Engine | None = None

    @property
    def deps(self) -> Deps:
        with self._lock:
            if self._deps is None:
                if self.on_complete is None:
                    raise RuntimeError(NOT_STARTED)
                self._deps = build_deps(self.settings, self.on_complete)
            return self._deps

    @property
    def engine(self) -> Engine:
        """This process's engine, started on first use."""
        deps = self.deps
        with self._lock:
            if self._engine is None:
                if self.republish is None:
                    raise RuntimeError(NOT_STARTED)
                self._engine = Engine(
                    deps,
                    self.republish,
                    threads=deps.settings.worker_concurrency,
                    max_rows=deps.settings.worker_max_rows,
                )
            return self._engine

    def close(self) -> int:
        """Warm shutdown: hand the engine's held rows back to the queue; returns how many.
        The resources stay: a finalizer or callback may still run in this process."""
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is None:
            return 0
        return engine.close(engine.deps.settings.shutdown_wait_s)


# The one context of this process: worker/tasks.py starts it when the worker's tasks are
# loaded; ``configure`` replaces its settings (embedded runs, tests), in either order.
NOT_STARTED = "worker.runtime.start(...) was never called (import worker.tasks)"
_lock = threading.Lock()
_context: WorkerContext | None = None


def start(on_complete: Callable[[str], None], republish: Callable[[str, int], None]) -> None:
    """Make this process's context: how it publishes, on the settings configured or the
    environment's (a worker's start)."""
    _swap(
        lambda old: WorkerContext(old.settings if old else get_settings(), on_complete, republish)
    )


def configure(settings: Settings) -> None:
    """Replace the process's settings (embedded runs, tests); an engine running with the
    old ones hands its rows back first, and resources are rebuilt on first use."""
    _swap(lambda old: WorkerContext(settings, *((old.on_complete, old.republish) if old else ())))


def _swap(make: Callable[[WorkerContext | None], WorkerContext]) -> None:
    global _context  # noqa: PLW0603 - one context per process
    with _lock:
        old = _context
    if old is not None:
        old.close()
    with _lock:
        _context = make(old)


def context() -> WorkerContext:
    with _lock:
        if _context is None:
            raise RuntimeError(NOT_STARTED)
        return _context


def get_deps() -> Deps:
    return context().deps


def get_engine() -> Engine:
    return context().engine


def close_engine() -> int:
    """Warm shutdown of this process's engine (its held rows go back to the queue)."""
    with _lock:
        current = _context
    return 0 if current is None else current.close()


def limits_factory(settings: Settings) -> Callable[[str], ProviderLimits | None]:
    """Per-provider limits on the shared Redis, built on first use (free providers: None)."""
    built: dict[str, ProviderLimits | None] = {}
    lock = threading.Lock()
    state: dict[str, Any] = {}

    def get(provider: str) -> ProviderLimits | None:
        with lock:
            if provider not in built:
                account = account_of(provider)
                if account is None:
                    built[provider] = None
                else:
                    if "backends" not in state:
                        state["loop"] = BackgroundLoop()
                        state["backends"] = redis_backends(
                            state["loop"], settings.effective_redis_url
                        )
                    built[provider] = provider_limits(
                        settings, provider, account, state["loop"], state["backends"]
                    )
            return built[provider]

    return get


def build_deps(settings: Settings, on_complete: Callable[[str], None]) -> Deps:
    return Deps(
        settings=settings,
        store=BatchStore.from_url(settings.effective_redis_url),
        fetch=SourceFetcher(settings),
        storage=Storage(settings),
        on_batch_complete=on_complete,
        rand=random.SystemRandom().random,
        limits=limits_factory(settings),
    )
