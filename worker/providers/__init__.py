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


# The environment variable each paid provider's key comes from (Settings reads them).
KEY_VARIABLES: dict[str, str] = {"runware": "RUNWARE_API_KEY", "fal": "FAL_KEY"}


def available() -> list[str]:
    return sorted(REGISTRY)


def missing_key(name: str, settings: Settings) -> str | None:
    """The variable a provider's key is missing from here, or None (set, or none needed)."""
    variable = KEY_VARIABLES.get(name)
    if variable is None or settings.provider_key(name) is not None:
        return None
    return variable


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
