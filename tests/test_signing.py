"""worker/signing.py: bgswap's signature header and Shopify's HMAC."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess

import pytest

from worker.signing import SignatureError, parse, shopify_hmac, sign, verify, verify_shopify

SECRET = "whsec_test_7f3a"
BODY = b'{"batch_id":"b1","type":"batch.completed"}'
T = 1_790_000_000


def test_sign_matches_an_independent_hmac() -> None:
    header = sign(SECRET, BODY, T)
    expected = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert header == f"t={T},v1={expected}"


def test_verify_accepts_its_own_signature_within_tolerance() -> None:
    header = sign(SECRET, BODY, T)
    assert verify(SECRET, header, BODY, now=T) == T
    assert verify(SECRET, header, BODY, now=T + 300) == T
    assert verify(SECRET, header, BODY, now=T - 300) == T


@pytest.mark.parametrize("now", [T + 301, T - 301, T + 86_400])
def test_verify_refuses_stale_and_future_timestamps(now: int) -> None:
    with pytest.raises(SignatureError) as err:
        verify(SECRET, sign(SECRET, BODY, T), BODY, now=now)
    assert err.value.reason == "stale"


def test_verify_refuses_a_changed_body_or_another_secret() -> None:
    header = sign(SECRET, BODY, T)
    with pytest.raises(SignatureError) as err:
        verify(SECRET, header, BODY + b" ", now=T)
    assert err.value.reason == "mismatch"
    with pytest.raises(SignatureError) as err:
        verify("other", header, BODY, now=T)
    assert err.value.reason == "mismatch"


def test_verify_refuses_a_timestamp_moved_with_the_old_signature() -> None:
    v1 = sign(SECRET, BODY, T).split("v1=")[1]
    with pytest.raises(SignatureError) as err:
        verify(SECRET, f"t={T + 10},v1={v1}", BODY, now=T + 10)
    assert err.value.reason == "mismatch"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "garbage",
        "t=abc,v1=00",
        f"t={T}",
        "v1=00",
        f"t={T},t={T},v1=00",
        "t=,v1=",
        f"t={T},v1",
    ],
)
def test_verify_refuses_malformed_headers(header: str | None) -> None:
    with pytest.raises(SignatureError) as err:
        verify(SECRET, header, BODY, now=T)
    assert err.value.reason == "malformed"
    assert err.value.message


def test_rotation_several_v1_entries_any_may_match() -> None:
    new = sign("new-secret", BODY, T).split("v1=")[1]
    old = sign(SECRET, BODY, T).split("v1=")[1]
    header = f"t={T},v1={new},v1={old}"
    assert verify(SECRET, header, BODY, now=T) == T
    assert verify("new-secret", header, BODY, now=T) == T
    with pytest.raises(SignatureError):
        verify("third", header, BODY, now=T)
    assert parse(header) == (T, [new, old])


def test_unknown_schemes_are_ignored_and_non_ascii_is_a_mismatch() -> None:
    header = sign(SECRET, BODY, T) + ",v0=deadbeef"
    assert verify(SECRET, header, BODY, now=T) == T
    with pytest.raises(SignatureError) as err:
        verify(SECRET, f"t={T},v1=é", BODY, now=T)
    assert err.value.reason == "mismatch"


# A products/create payload as Shopify sends it (trimmed), signed with the app's secret.
SHOPIFY_SECRET = "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"
SHOPIFY_BODY = json.dumps(
    {
        "id": 788032119674292922,
        "title": "Example T-Shirt",
        "vendor": "Acme",
        "product_type": "Shirts",
        "handle": "example-t-shirt",
        "images": [
            {"id": 539438707724640965, "src": "https://cdn.shopify.com/s/files/1/shirt.jpg"}
        ],
    },
    separators=(",", ":"),
).encode()


def _openssl_hmac(secret: str, body: bytes) -> str:
    """The expected header computed by another implementation: openssl, then base64."""
    digest = subprocess.run(
        ["openssl", "dgst", "-sha256", "-hmac", secret, "-binary"],
        input=body, capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert len(digest) == 32
    return base64.b64encode(digest).decode()


def test_shopify_hmac_matches_openssl() -> None:
    expected = _openssl_hmac(SHOPIFY_SECRET, SHOPIFY_BODY)
    assert shopify_hmac(SHOPIFY_SECRET, SHOPIFY_BODY) == expected
    verify_shopify(SHOPIFY_SECRET, SHOPIFY_BODY, expected)


def test_shopify_known_vector() -> None:
    # RFC 4231 test case 2 (HMAC-SHA256, key "Jefe"), in Shopify's base64 form.
    body = b"what do ya want for nothing?"
    digest = bytes.fromhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    verify_shopify("Jefe", body, base64.b64encode(digest).decode())


@pytest.mark.parametrize("header", [None, "", "AAAA", "not base64 at all é"])
def test_shopify_refuses_a_bad_hmac(header: str | None) -> None:
    with pytest.raises(SignatureError):
        verify_shopify(SHOPIFY_SECRET, SHOPIFY_BODY, header)


def test_shopify_refuses_a_changed_body() -> None:
    good = _openssl_hmac(SHOPIFY_SECRET, SHOPIFY_BODY)
    with pytest.raises(SignatureError) as err:
        verify_shopify(SHOPIFY_SECRET, SHOPIFY_BODY.replace(b"Acme", b"Acmf"), good)
    assert err.value.reason == "mismatch"
