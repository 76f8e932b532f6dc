"""Provider registry: an explicit name -> factory table, no import-time magic."""

from __future__ import annotations

from collections.abc import Callable

from worker.errors import UsageError
from worker.providers.base import Provider
from worker.providers.fal import FalProvider
from worker.providers.local import LocalProvider
from worker.providers.runware import RunwareProvider
from worker.settings import Settings

REGISTRY: dict[str, Callable[[Settings], Provider]] = {
    "local": lambda settings: LocalProvider(),
    "runware": RunwareProvider,
    "fal": FalProvider,
}


def available() -> list[str]:
    return sorted(REGISTRY)


def get_provider(name: str, settings: Settings) -> Provider:
    try:
        factory = REGISTRY[name]
    except KeyError:
        raise UsageError(
            f"provider {name!r} is not available (available: {', '.join(available())})"
        ) from None
    return factory(settings)


def default_provider(settings: Settings) -> str:
    """A paid provider when its key is set and it is registered, else `local`."""
    for name in ("runware", "fal"):
        if name in REGISTRY and settings.provider_key(name) is not None:
            return name
    return "local"
