"""Per-process wiring: settings -> the resources a worker holds for its whole life."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from worker.engine import Engine
from worker.fetch import SourceFetcher
from worker.limits import BackgroundLoop, ProviderLimits, provider_limits, redis_backends
from worker.pipeline import Deps
from worker.settings import Settings, get_settings
from worker.state import BatchStore
from worker.storage import Storage

_lock = threading.Lock()
_deps: Deps | None = None
_settings: Settings | None = None
_on_complete: Callable[[str], None] | None = None
_republish: Callable[[str, int], None] | None = None
_engine: Engine | None = None


def configure(settings: Settings) -> None:
    """Replace the process's settings (embedded runs, tests); resources are rebuilt lazily
    (an engine running with the old ones hands its rows back first)."""
    global _deps, _settings  # noqa: PLW0603 - one wiring point per process
    close_engine()
    with _lock:
        _settings = settings
        _deps = None


def set_publishers(
    on_complete: Callable[[str], None], republish: Callable[[str, int], None]
) -> None:
    """How a worker enqueues the finalizer of a batch it completed, and a row's message."""
    global _deps, _on_complete, _republish  # noqa: PLW0603
    with _lock:
        _on_complete = on_complete
        _republish = republish
        _deps = None


def get_engine() -> Engine:
    """This process's engine (worker/engine.py), started on first use."""
    global _engine  # noqa: PLW0603
    deps = get_deps()
    with _lock:
        if _engine is None:
            if _republish is None:
                raise RuntimeError("worker.runtime.set_publishers(...) was never called")
            _engine = Engine(
                deps,
                _republish,
                threads=deps.settings.worker_concurrency,
                max_rows=deps.settings.worker_max_rows,
            )
        return _engine


def close_engine() -> int:
    """Warm shutdown: hand the engine's held rows back to the queue; returns how many."""
    global _engine
    with _lock:
        engine, _engine = _engine, None
    if engine is None:
        return 0
    return engine.close(engine.deps.settings.shutdown_wait_s)


def limits_factory(settings: Settings) -> Callable[[str], ProviderLimits | None]:
    """Per-provider limits on the shared Redis, built on first use (free providers: None)."""
    built: dict[str, ProviderLimits | None] = {}
    lock = threading.Lock()
    state: dict[str, Any] = {}

    def get(provider: str) -> ProviderLimits | None:
        with lock:
            if provider not in built:
                if provider not in ("runware", "fal"):
                    built[provider] = None
                else:
                    if "backends" not in state:
                        state["loop"] = BackgroundLoop()
                        state["backends"] = redis_backends(
                            state["loop"], settings.effective_redis_url
                        )
                    built[provider] = provider_limits(
                        settings, provider, state["loop"], state["backends"]
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


def get_deps() -> Deps:
    global _deps  # noqa: PLW0603
    with _lock:
        if _deps is None:
            if _on_complete is None:
                raise RuntimeError("worker.runtime.set_publishers(...) was never called")
            _deps = build_deps(_settings or get_settings(), _on_complete)
        return _deps
