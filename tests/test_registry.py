"""The provider registry (worker/providers/__init__.py): each provider's SPEC is the one
place its name, caps, account and webhooks are declared, and every part reads it there."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import SecretStr

from producer import validation
from worker import completions
from worker.limits import in_flight
from worker.providers import PAID, SPECS, default_provider, get_provider, missing_key
from worker.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_spec_makes_the_provider_it_names(name: str) -> None:
    provider = get_provider(name, Settings())
    assert provider.name == SPECS[name].name == name
    assert validation.PROVIDER_CAPS[name] is SPECS[name].caps  # what validation applies


def test_the_paid_providers_are_the_specs_with_an_account_in_registry_order() -> None:
    assert PAID == ("runware", "fal")
    assert all(SPECS[n].account is not None for n in PAID) and SPECS["local"].account is None
    assert completions.PROVIDERS == {n for n, s in SPECS.items() if s.webhooks} == set(PAID)
    assert tuple(SPECS) == validation.PROVIDERS


@pytest.mark.parametrize("name", PAID)
def test_a_paid_providers_key_is_read_where_its_spec_says(name: str) -> None:
    account = SPECS[name].account
    assert account is not None
    assert missing_key(name, Settings()) == account.key_variable
    settings = Settings(**{account.key_variable.lower(): SecretStr("k-123")})
    assert missing_key(name, settings) is None and account.key(settings) == SecretStr("k-123")
    assert default_provider(Settings()) == "local"
    # the first paid provider of the registry whose key is set
    assert default_provider(settings) == name
    assert re.search(rf"`{account.key_variable}`", README.read_text())  # documented


def test_the_in_flight_metric_covers_every_account(redis_client: object) -> None:
    settings = Settings(runware_max_in_flight=7, fal_max_in_flight=None)
    found = in_flight(settings, redis_client)
    assert found == [("runware", 0.0, 7.0), ("fal", 0.0, None)]
