"""Provider registry: every provider's ``SPEC`` (worker/providers/base.py), listed here
explicitly, no import-time magic. A new provider is its module, one line below and its
settings' fields (README: Adding a provider)."""

from __future__ import annotations

from pydantic import SecretStr

from worker.errors import UsageError
from worker.providers import fal, local, runware
from worker.providers.base import Account, Provider, ProviderSpec
from worker.settings import Settings

SPECS: dict[str, ProviderSpec] = {s.name: s for s in (runware.SPEC, fal.SPEC, local.SPEC)}
# Tried in this order for a default, when their key is set.
PAID = tuple(name for name, spec in SPECS.items() if spec.account is not None)


def available() -> list[str]:
    return sorted(SPECS)


def spec_for(name: str) -> ProviderSpec:
    try:
        return SPECS[name]
    except KeyError:
        raise UsageError(
            f"provider {name!r} is not available (available: {', '.join(available())})"
        ) from None


def account_of(name: str) -> Account | None:
    """A paid provider's account; None for a free or unknown one."""
    spec = SPECS.get(name)
    return spec.account if spec is not None else None


def provider_key(name: str, settings: Settings) -> SecretStr | None:
    """A paid provider's account key, as set (None: unset, or a free provider)."""
    account = account_of(name)
    return account.key(settings) if account is not None else None


def missing_key(name: str, settings: Settings) -> str | None:
    """The variable a provider's key is missing from here, or None (set, or none needed)."""
    account = account_of(name)
    if account is None or account.key(settings) is not None:
        return None
    return account.key_variable


def get_provider(name: str, settings: Settings) -> Provider:
    return spec_for(name).make(settings)


def default_provider(settings: Settings) -> str:
    """A paid provider when its key is set, else `local`."""
    for name in PAID:
        if provider_key(name, settings) is not None:
            return name
    return "local"
