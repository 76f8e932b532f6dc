"""Whole-command checks and their one-line messages, as plain functions: misspelt
columns, providers named for every row, settings with bad values, --strict."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from producer.console import enable_debug_logging
from producer.manifest import read_manifest
from producer.preflight import check_provider, strict_refusal
from producer.suggest import column_suggestion
from producer.validation import RowDefaults
from worker.errors import Codes, UsageError
from worker.logs import RedactingFormatter
from worker.settings import Settings, load_settings


@pytest.mark.parametrize(
    ("name", "present", "expected"),
    [
        ("backgroud", {"id", "image"}, "background"),
        ("Background", {"id", "image"}, "background"),
        ("shadows", {"id", "image"}, "shadow"),
        ("provder", {"id", "image"}, "provider"),
        ("images", {"id"}, "image"),
        # a known column the row already has is not what it misspelt
        ("images", {"id", "image"}, None),
        ("image_url", {"id"}, None),
        # ordinary metadata stays metadata
        ("product", {"id", "image"}, None),
        ("price", {"id", "image"}, None),
        ("category", {"id", "image"}, None),
        ("sku", {"id", "image"}, None),
        ("background", {"id", "image"}, None),
        ("b" * 500, {"id", "image"}, None),
    ],
)
def test_column_suggestions(name: str, present: set[str], expected: str | None) -> None:
    assert column_suggestion(name, present) == expected


def warnings_of(data: bytes, fmt: str) -> list[list[str]]:
    defaults = RowDefaults(base_dir=Path("/nonexistent"))
    return [list(o.warnings) for o in read_manifest(io.BytesIO(data), fmt, defaults)]  # type: ignore[arg-type]


def test_a_misspelt_csv_column_is_warned_about_once_and_kept_as_metadata() -> None:
    data = b"id,image,prompt,backgroud,sku\na,a.png,p,#fff,1\nb,b.png,p,#000,2\nc,c.png,p,,3\n"
    assert warnings_of(data, "csv") == [
        ["unknown column 'backgroud': did you mean 'background'?"],
        [],
        [],
    ]
    outcome = next(iter(read_manifest(io.BytesIO(data), "csv", RowDefaults())))
    assert outcome.raw["backgroud"] == "#fff"


def test_a_misspelt_jsonl_key_is_warned_about_on_the_first_row_that_has_it() -> None:
    data = (
        b'{"id": "a", "image": "a.png", "prompt": "p"}\n'
        b'{"id": "b", "image": "b.png", "prompt": "p", "shadows": false, "brand": "x"}\n'
        b'{"id": "c", "image": "c.png", "prompt": "p", "shadows": true}\n'
        b'{"id": "d", "image": "d.png", "prompt": "p", "Background": "#fff"}\n'
    )
    assert warnings_of(data, "jsonl") == [
        [],
        ["unknown column 'shadows': did you mean 'shadow'?"],
        [],
        ["unknown column 'Background': did you mean 'background'?"],
    ]


def test_jsonl_keys_looked_at_are_bounded() -> None:
    rows = b"".join(
        b'{"id": "r%d", "image": "a.png", "prompt": "p", "k%d": 1}\n' % (n, n) for n in range(1200)
    )
    tail = b'{"id": "z", "image": "a.png", "prompt": "p", "backgroud": "#fff"}\n'
    found = [w for ws in warnings_of(rows + tail, "jsonl") for w in ws]
    assert found == []  # past the cap, new names are no longer looked at (memory stays flat)


def test_a_provider_for_every_row_must_be_known_and_have_its_key() -> None:
    keyless = Settings()
    assert check_provider(keyless, "local", "--provider") == "local"
    assert check_provider(keyless, " LOCAL ", "--provider") == "local"
    with pytest.raises(UsageError, match=r"--provider 'replicate': no such provider"):
        check_provider(keyless, "replicate", "--provider")
    with pytest.raises(UsageError, match=r"did you mean 'runware'\?"):
        check_provider(keyless, "runwar", "--provider")
    with pytest.raises(UsageError, match="--provider runware needs RUNWARE_API_KEY"):
        check_provider(keyless, "runware", "--provider")
    with pytest.raises(UsageError, match="--set provider fal needs FAL_KEY"):
        check_provider(keyless, "fal", "--set provider")
    keyed = Settings(runware_api_key="k" * 20)  # type: ignore[arg-type]
    assert check_provider(keyed, "runware", "--provider") == "runware"


def test_a_row_naming_a_provider_without_its_key_is_a_row_error() -> None:
    defaults = RowDefaults(
        base_dir=Path("/nonexistent"),
        available_providers=frozenset({"local", "fal", "runware"}),
        missing_keys={"fal": "FAL_KEY"},
    )
    data = b"id,image,prompt,provider\na,https://example.com/a.png,p,fal\n"
    (outcome,) = read_manifest(io.BytesIO(data), "csv", defaults)
    (error,) = outcome.errors
    assert (error.column, error.code) == ("provider", Codes.INPUT_PROVIDER_UNAVAILABLE)
    assert error.code == "input.provider_unavailable"
    assert "FAL_KEY" in error.reason


def test_strict_refusal_names_bad_rows_and_misspelt_columns() -> None:
    assert strict_refusal(0, 5, []) is None
    assert strict_refusal(2, 5, []) == "--strict: 2 of 5 rows are invalid"
    assert strict_refusal(0, 5, ["unknown column 'x'"]) == "--strict: unknown column 'x'"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("BGSWAP_RUNWARE_RATE", "fast", "bad setting BGSWAP_RUNWARE_RATE='fast': invalid rate"),
        (
            "BGSWAP_WORKER_CONCURRENCY",
            "-1",
            "bad setting BGSWAP_WORKER_CONCURRENCY='-1': input should be greater than or equal to 1",
        ),
        (
            "BGSWAP_RUNWARE_DELIVERY",
            "maybe",
            "bad setting BGSWAP_RUNWARE_DELIVERY='maybe': input should be 'async' or 'sync'",
        ),
        ("BGSWAP_MAX_ATTEMPTS", "many", "bad setting BGSWAP_MAX_ATTEMPTS='many': input should be"),
    ],
)
def test_a_bad_setting_names_its_variable_value_and_what_is_expected(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(UsageError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_debug_logging_never_shows_keys_passwords_or_presigned_queries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RUNWARE_API_KEY", "rw-very-secret-key")
    monkeypatch.setenv("BGSWAP_BROKER_URL", "redis://user:hunter22@redis.internal:6379/0")
    out = io.StringIO()
    handler = enable_debug_logging(out)
    try:
        log = logging.getLogger("bgswap.test")
        log.debug("key %s", "rw-very-secret-key")
        log.debug("put https://b.s3.amazonaws.com/k.jpg?X-Amz-Signature=abc123 done")
        log.debug("broker redis://user:hunter22@redis.internal:6379/0")
        try:
            raise RuntimeError("boom with hunter22")
        except RuntimeError:
            log.debug("failed", exc_info=True)
    finally:
        logging.getLogger("bgswap").removeHandler(handler)
        logging.getLogger("bgswap").propagate = True
        logging.getLogger("bgswap").setLevel(logging.NOTSET)
    text = out.getvalue()
    assert "bgswap.test DEBUG key ***" in text
    assert "https://b.s3.amazonaws.com/k.jpg done" in text
    assert "redis://redis.internal:6379/0" in text
    assert "boom with ***" in text
    for secret in ("rw-very-secret-key", "hunter22", "abc123", "X-Amz"):
        assert secret not in text
    assert isinstance(handler.formatter, RedactingFormatter)
