"""Properties of the manifest reader on arbitrary input, and its memory while streaming."""

from __future__ import annotations

import csv
import io
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.manifest import Format, RowDefaults, RowOutcome, read_manifest
from worker.errors import ManifestUnreadable

DEFAULTS = RowDefaults(
    prompt="{id}",
    available_providers=frozenset({"local", "fal", "runware"}),
    base_dir=Path("/nonexistent"),
)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text with the characters that matter to CSV and JSON: separators, quotes, line breaks.
TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from([",", '"', "\n", "\r", " ", "|", "{", "}", ":", "#", "\\", "/"]),
        st.characters(codec="utf-8"),
    ),
    max_size=20,
)
COLUMN = st.sampled_from(
    [
        "id",
        "image",
        "prompt",
        "provider",
        "seed",
        "num_results",
        "color_palette",
        "style_code",
        "style_reference_images",
        "background",
        "shadow",
        "output",
        "title",
    ]
)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


def read_all(data: bytes, fmt: Format) -> list[RowOutcome] | None:
    """Every outcome, or None when the input is refused as a whole (the only exception)."""
    try:
        return list(read_manifest(io.BytesIO(data), fmt, DEFAULTS))
    except ManifestUnreadable as exc:
        assert str(exc) and "\n" not in str(exc)
        return None


def check_outcomes(outcomes: list[RowOutcome], expected_rows: int | None) -> None:
    if expected_rows is not None:
        assert len(outcomes) == expected_rows
    assert [o.index for o in outcomes] == list(range(len(outcomes)))
    lines = [o.line for o in outcomes]
    assert lines == sorted(lines) and len(set(lines)) == len(lines)
    for outcome in outcomes:
        assert (outcome.spec is not None) == outcome.ok
        assert outcome.ok == (len(outcome.errors) == 0)
        assert all(e.line == outcome.line for e in outcome.errors)


def csv_data_rows(text: str) -> int:
    """Records after the header, as the csv module reads them (rows of blanks are skipped)."""
    records = [r for r in csv.reader(io.StringIO(text, newline="")) if any(f.strip() for f in r)]
    return max(len(records) - 1, 0)


HEADER_NAME = TEXT.filter(
    lambda t: t.strip() not in ("", "id", "image", "prompt") and "\x00" not in t
)


@SETTINGS
@given(
    extra_columns=st.lists(HEADER_NAME, max_size=3, unique_by=str.strip),
    rows=st.lists(st.lists(TEXT, max_size=6), max_size=12),
)
def test_random_csv(extra_columns: list[str], rows: list[list[str]]) -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "image", "prompt", *extra_columns])
    writer.writerows(rows)
    text = out.getvalue()
    outcomes = read_all(text.encode(), "csv")
    assert outcomes is not None  # the header is a good one
    check_outcomes(outcomes, csv_data_rows(text))


@SETTINGS
@given(
    rows=st.lists(
        st.dictionaries(COLUMN | TEXT, JSON_VALUE, max_size=6)
        | TEXT.map(lambda t: ("raw", t))
        | st.just(("raw", "")),
        max_size=12,
    )
)
def test_random_jsonl(rows: list[Any]) -> None:
    lines = []
    for row in rows:
        if isinstance(row, tuple):  # a line as is: blank, or (mostly) not JSON at all
            lines.append(row[1].replace("\n", " "))
        else:
            lines.append(json.dumps(row, ensure_ascii=bool(len(lines) % 2)))
    data = ("\n".join(lines) + "\n").encode()
    outcomes = read_all(data, "jsonl")
    if outcomes is not None:
        non_blank = sum(1 for line in data.split(b"\n") if line.decode().strip())
        check_outcomes(outcomes, non_blank)


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    outcomes = read_all(data, "jsonl")
    if outcomes is not None:
        lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
        check_outcomes(outcomes, sum(1 for line in lines if line.decode(errors="replace").strip()))
    outcomes = read_all(data, "csv")
    if outcomes is not None:
        check_outcomes(outcomes, None)


@SETTINGS
@given(head=st.sampled_from([b"id,image,prompt\n", b"{}\n", b""]), tail=st.binary(max_size=300))
def test_random_bytes_after_a_good_start(head: bytes, tail: bytes) -> None:
    for fmt in ("csv", "jsonl"):
        outcomes = read_all(head + tail, fmt)  # type: ignore[arg-type]
        if outcomes is not None:
            check_outcomes(outcomes, None)


def test_reading_100k_rows_streams(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "image", "prompt", "provider", "output_format", "title"])
        for n in range(100_000):
            writer.writerow(
                [
                    f"SKU-{n:07d}",
                    f"https://cdn.example.com/catalogue/2024/SKU-{n:07d}/front.jpg",
                    "Replace the background with {title} on a sunlit marble counter",
                    "local",
                    "png",
                    f"Ceramic mug no. {n}",
                ]
            )
    size = path.stat().st_size
    rows = ok = 0
    with path.open("rb") as stream:
        started = time.perf_counter()
        tracemalloc.start()
        try:
            for outcome in read_manifest(stream, "csv", DEFAULTS):
                rows += 1
                ok += outcome.ok
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        elapsed = time.perf_counter() - started
    assert (rows, ok) == (100_000, 100_000)
    print(f"\n{size / 1e6:.1f} MB file, peak {peak / 1e6:.2f} MB, {elapsed:.1f} s traced")
    assert peak < size / 4
