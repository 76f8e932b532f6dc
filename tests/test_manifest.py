"""Manifest reading and row validation: one test per rule, in CSV and in JSON Lines."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from producer.manifest import (
    ROW,
    Format,
    RowDefaults,
    RowOutcome,
    detect_format,
    parse_set_options,
    read_manifest,
)
from producer.validation import validate_row
from worker.errors import Codes, FieldError, ManifestUnreadable, UsageError
from worker.jobs import ColorPalette, JobSpec, PaletteMember, safe_id

ALL_PROVIDERS = frozenset({"local", "fal", "runware"})
URL = "https://cdn.example.com/products/a.jpg"
BASE: dict[str, Any] = {"id": "sku-1", "image": URL, "prompt": "a sunlit marble counter"}
FORMATS: tuple[Format, ...] = ("csv", "jsonl")


# -- helpers ------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    return str(value)


def encode(fmt: Format, rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Rows as a CSV (header: every key in order of appearance) or as JSON Lines."""
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows).encode()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    return out.getvalue().encode()


def defaults(tmp: Path | None = None, **kw: Any) -> RowDefaults:
    kw.setdefault("available_providers", ALL_PROVIDERS)
    if tmp is not None:
        kw.setdefault("base_dir", tmp)
    return RowDefaults(**kw)


def read(
    fmt: Format, rows: Sequence[Mapping[str, Any]], d: RowDefaults | None = None
) -> list[RowOutcome]:
    return list(read_manifest(io.BytesIO(encode(fmt, rows)), fmt, d or defaults()))


def read_bytes(fmt: Format, data: bytes, d: RowDefaults | None = None) -> list[RowOutcome]:
    return list(read_manifest(io.BytesIO(data), fmt, d or defaults()))


def first_line(fmt: Format) -> int:
    """The line of the first data row: after the header in CSV."""
    return 2 if fmt == "csv" else 1


def one(fmt: Format, d: RowDefaults | None = None, **changes: Any) -> RowOutcome:
    """The outcome of BASE changed by ``changes`` (a value of None removes the column)."""
    row = {**BASE, **changes}
    row = {k: v for k, v in row.items() if v is not None}
    (outcome,) = read(fmt, [row], d)
    return outcome


def spec_of(outcome: RowOutcome) -> JobSpec:
    assert outcome.ok, outcome.errors
    assert outcome.spec is not None
    return outcome.spec


def error(outcome: RowOutcome, code: str, column: str, line: int) -> FieldError:
    """The outcome's error with this code, checked for column and line."""
    assert not outcome.ok
    assert outcome.spec is None
    matching = [e for e in outcome.errors if e.code == code]
    assert matching, f"no {code} in {outcome.errors}"
    found = matching[0]
    assert (found.column, found.line) == (column, line), found
    return found


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff fake jpeg")
    return path


fmts = pytest.mark.parametrize("fmt", FORMATS)


# -- a good row ---------------------------------------------------------------------------


@fmts
def test_valid_row_becomes_a_spec(fmt: Format) -> None:
    outcome = one(fmt, colour="red")
    spec = spec_of(outcome)
    assert (outcome.index, outcome.line, outcome.row_id) == (0, first_line(fmt), "sku-1")
    assert spec.image == URL
    assert spec.prompt == "a sunlit marble counter"
    assert spec.provider == "local"
    assert spec.meta == {"colour": "red"}
    assert outcome.raw["image"] == URL


@fmts
def test_every_error_of_a_row_is_collected(fmt: Format) -> None:
    outcome = one(fmt, image="ftp://x/y", seed="many", output_quality=5)
    line = first_line(fmt)
    codes = {(e.code, e.column, e.line) for e in outcome.errors}
    assert codes == {
        (Codes.INVALID_URL, "image", line),
        (Codes.INVALID_NUMBER, "seed", line),
        (Codes.OUT_OF_RANGE, "output_quality", line),
    }


# -- id -----------------------------------------------------------------------------------


@fmts
def test_id_is_required(fmt: Format) -> None:
    outcome = one(fmt, id="  ")
    error(outcome, Codes.MISSING_FIELD, "id", first_line(fmt))
    assert outcome.row_id is None


def test_id_key_missing_in_jsonl() -> None:
    (outcome,) = read("jsonl", [{"image": URL, "prompt": "p"}])
    error(outcome, Codes.MISSING_FIELD, "id", 1)


@fmts
def test_id_longer_than_256_is_refused(fmt: Format) -> None:
    error(one(fmt, id="x" * 257), Codes.TOO_LONG, "id", first_line(fmt))
    assert spec_of(one(fmt, id="x" * 256)).id == "x" * 256


@fmts
def test_id_is_stripped(fmt: Format) -> None:
    assert spec_of(one(fmt, id="  sku 9 ")).id == "sku 9"


@fmts
def test_duplicate_id_names_the_first_line(fmt: Format) -> None:
    rows = [BASE, {**BASE, "id": "other"}, {**BASE, "id": " sku-1 "}]
    outcomes = read(fmt, rows)
    assert [o.ok for o in outcomes] == [True, True, False]
    found = error(outcomes[2], Codes.DUPLICATE_ID, "id", first_line(fmt) + 2)
    assert found.reason == f"duplicate id 'sku-1' (first seen on line {first_line(fmt)})"


@fmts
def test_ids_with_the_same_output_key_are_duplicates(fmt: Format) -> None:
    slugged = safe_id("a/b")  # a plain id that safe_id keeps as it is
    assert safe_id(slugged) == slugged
    outcomes = read(fmt, [{**BASE, "id": "a/b"}, {**BASE, "id": slugged}])
    error(outcomes[1], Codes.DUPLICATE_ID, "id", first_line(fmt) + 1)


def test_duplicates_are_found_among_many_ids() -> None:
    rows = [{**BASE, "id": f"id-{n}"} for n in range(5000)]
    rows += [{**BASE, "id": "id-7"}, {**BASE, "id": "id-4999"}, {**BASE, "id": "new"}]
    outcomes = read("jsonl", rows)
    assert sum(o.ok for o in outcomes) == 5001
    assert error(outcomes[5000], Codes.DUPLICATE_ID, "id", 5001).reason.endswith("line 8)")
    assert error(outcomes[5001], Codes.DUPLICATE_ID, "id", 5002).reason.endswith("line 5000)")


def test_duplicate_of_a_rejected_row_still_counts() -> None:
    outcomes = read("csv", [{**BASE, "seed": "x"}, BASE])
    error(outcomes[1], Codes.DUPLICATE_ID, "id", 3)


# -- image --------------------------------------------------------------------------------


@fmts
def test_image_is_required(fmt: Format) -> None:
    error(one(fmt, image=""), Codes.MISSING_FIELD, "image", first_line(fmt))


@fmts
@pytest.mark.parametrize(
    "ref",
    [
        "https://cdn.example.com/a.jpg?X-Amz-Signature=abc",
        "http://example.com:8080/a.png",
        "HTTPS://Example.COM/a.png",
        "s3://bucket/path/to/key.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
    ],
)
def test_image_references_that_are_accepted(fmt: Format, ref: str) -> None:
    assert spec_of(one(fmt, image=ref)).image == ref


@fmts
@pytest.mark.parametrize(
    ("ref", "code"),
    [
        ("http:///no-host.jpg", Codes.INVALID_URL),
        ("https://[::1/a.jpg", Codes.INVALID_URL),
        ("https://example.com:99999/a.jpg", Codes.INVALID_URL),
        ("ftp://example.com/a.jpg", Codes.INVALID_URL),
        ("file:///etc/passwd", Codes.INVALID_URL),
        ("s3://bucket", Codes.INVALID_URL),
        ("s3://bucket/", Codes.INVALID_URL),
        ("s3:///key", Codes.INVALID_URL),
        ("s3://bucket/folder/", Codes.INVALID_URL),
        ("data:image/png;base64,not base64!", Codes.INVALID_URL),
        ("data:image/png;base64,abc", Codes.INVALID_URL),
        ("data:text/plain;base64,aGk=", Codes.INVALID_URL),
        ("data:image/png,raw", Codes.INVALID_URL),
        ("no/such/file.jpg", Codes.FILE_NOT_FOUND),
    ],
)
def test_bad_image_references(fmt: Format, ref: str, code: str, tmp_path: Path) -> None:
    error(one(fmt, defaults(tmp_path), image=ref), code, "image", first_line(fmt))


@fmts
def test_local_image_is_resolved_against_base_dir(fmt: Format, image: Path) -> None:
    spec = spec_of(one(fmt, defaults(image.parent), image="photo.jpg"))
    assert spec.image == str(image)
    assert Path(spec.image).is_absolute()
    assert spec_of(one(fmt, defaults(Path("/")), image=str(image))).image == str(image)


@fmts
def test_local_image_that_is_a_directory(fmt: Format, tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    found = error(
        one(fmt, defaults(tmp_path), image="dir"), Codes.FILE_NOT_FOUND, "image", first_line(fmt)
    )
    assert "not a regular file" in found.reason


PRIVATE_HOSTS = [
    "localhost",
    "LOCALHOST.",
    "shop.localhost",
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f.0.0.1",
    "0.0.0.0",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "224.0.0.1",
    "255.255.255.255",
    "[::1]",
    "[::]",
    "[fe80::1]",
    "[fc00::1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:10.0.0.1]",
    "[ff02::1]",
]


@fmts
@pytest.mark.parametrize("host", PRIVATE_HOSTS)
def test_private_addresses_are_refused(fmt: Format, host: str) -> None:
    outcome = one(fmt, image=f"http://{host}:8000/a.jpg")
    error(outcome, Codes.PRIVATE_ADDRESS, "image", first_line(fmt))


@fmts
@pytest.mark.parametrize("host", ["example.com", "8.8.8.8", "[2606:4700::1111]", "1password.com"])
def test_public_addresses_are_accepted(fmt: Format, host: str) -> None:
    assert spec_of(one(fmt, image=f"https://{host}/a.jpg"))


@fmts
def test_private_addresses_are_allowed_when_configured(fmt: Format) -> None:
    d = defaults(allow_private_urls=True)
    assert spec_of(one(fmt, d, image="http://127.0.0.1:9000/a.jpg"))


# -- prompt -------------------------------------------------------------------------------


@fmts
def test_prompt_default_is_used_when_the_row_has_none(fmt: Format) -> None:
    d = defaults(prompt="studio scene")
    assert spec_of(one(fmt, d, prompt="")).prompt == "studio scene"
    assert spec_of(one(fmt, d, prompt="beach")).prompt == "beach"


@fmts
def test_prompt_is_required_without_default(fmt: Format) -> None:
    error(one(fmt, prompt=None), Codes.MISSING_FIELD, "prompt", first_line(fmt))


@fmts
def test_template_inserts_columns(fmt: Format) -> None:
    d = defaults(
        prompt="{title} on {surface}, {{literal}} {style_preset} #{id}",
        values={"style_preset": "EDITORIAL"},
    )
    outcome = one(fmt, d, prompt="", title="Red shoe", surface="marble")
    assert spec_of(outcome).prompt == "Red shoe on marble, {literal} EDITORIAL #sku-1"


@fmts
def test_template_in_the_row_prompt(fmt: Format) -> None:
    outcome = one(fmt, prompt="{title} }}{{", title="Lamp")
    assert spec_of(outcome).prompt == "Lamp }{"


@fmts
def test_template_unknown_field(fmt: Format) -> None:
    outcome = one(fmt, prompt="a {colour} {size} thing")
    found = error(outcome, Codes.UNKNOWN_TEMPLATE_FIELD, "prompt", first_line(fmt))
    assert "{colour}" in found.reason and "{size}" in found.reason


@fmts
@pytest.mark.parametrize("template", ["{oops", "oops}", "{title!r}", "{title:>10}", "{}", "{ }"])
def test_template_malformed(fmt: Format, template: str) -> None:
    outcome = one(fmt, prompt=template, title="x")
    error(outcome, Codes.BAD_TEMPLATE, "prompt", first_line(fmt))


@fmts
def test_default_template_errors_are_row_errors(fmt: Format) -> None:
    outcome = one(fmt, defaults(prompt="{nope}"), prompt=None)
    error(outcome, Codes.UNKNOWN_TEMPLATE_FIELD, "prompt", first_line(fmt))


@fmts
def test_prompt_empty_after_templating(fmt: Format) -> None:
    outcome = one(fmt, prompt="  {title}  ", title="")
    error(outcome, Codes.EMPTY_PROMPT, "prompt", first_line(fmt))


@fmts
def test_prompt_too_long(fmt: Format) -> None:
    found = error(one(fmt, prompt="x" * 2001), Codes.PROMPT_TOO_LONG, "prompt", first_line(fmt))
    assert "2001" in found.reason
    assert spec_of(one(fmt, prompt=" " + "x" * 2000 + " ")).prompt == "x" * 2000


# -- output and provider ------------------------------------------------------------------


@fmts
@pytest.mark.parametrize(
    "dest", ["https://bucket.s3.amazonaws.com/k.jpg?X-Amz-Signature=abc", "s3://bucket/out/k.jpg"]
)
def test_output_accepted(fmt: Format, dest: str) -> None:
    d = defaults(output_prefixes=("s3://bucket/out",))
    assert spec_of(one(fmt, d, output=dest)).output == dest


@fmts
@pytest.mark.parametrize(
    ("dest", "code"),
    [
        ("s3://bucket/prefix/", Codes.INVALID_URL),
        ("s3://bucket", Codes.INVALID_URL),
        ("/tmp/out.jpg", Codes.INVALID_URL),
        ("ftp://host/x", Codes.INVALID_URL),
        ("http://10.0.0.5/upload", Codes.PRIVATE_ADDRESS),
    ],
)
def test_output_refused(fmt: Format, dest: str, code: str) -> None:
    error(one(fmt, output=dest), code, "output", first_line(fmt))


@fmts
def test_provider_values(fmt: Format) -> None:
    assert spec_of(one(fmt, provider="FAL")).provider == "fal"
    error(one(fmt, provider="midjourney"), Codes.INVALID_ENUM, "provider", first_line(fmt))
    d = defaults(available_providers=frozenset({"local"}))
    found = error(
        one(fmt, d, provider="fal"), Codes.INPUT_PROVIDER_UNAVAILABLE, "provider", first_line(fmt)
    )
    assert "fal" in found.reason


@fmts
def test_provider_default_comes_from_defaults(fmt: Format) -> None:
    assert spec_of(one(fmt, defaults(provider="runware"))).provider == "runware"
    d = defaults(provider="runware", values={"provider": "fal"})
    assert spec_of(one(fmt, d)).provider == "fal"


# -- enums --------------------------------------------------------------------------------


@fmts
@pytest.mark.parametrize(
    ("column", "given", "expected"),
    [
        ("rendering_speed", "turbo", "TURBO"),
        ("rendering_speed", "default", "BALANCED"),
        ("magic_prompt", "Off", "OFF"),
        ("style_type", "realistic", "REALISTIC"),
        ("style_preset", "magazine_editorial", "MAGAZINE_EDITORIAL"),
        ("style_preset", "80s illustration", "80S_ILLUSTRATION"),
        ("output_format", "jpeg", "JPG"),
        ("output_format", "webp", "WEBP"),
    ],
)
def test_enums_are_normalised(fmt: Format, column: str, given: str, expected: str) -> None:
    spec = spec_of(one(fmt, defaults(provider="runware"), **{column: given}))
    assert getattr(spec, column) == expected


@fmts
@pytest.mark.parametrize(
    "column", ["rendering_speed", "magic_prompt", "style_type", "style_preset", "output_format"]
)
def test_enums_refuse_unknown_values(fmt: Format, column: str) -> None:
    error(one(fmt, **{column: "FOO"}), Codes.INVALID_ENUM, column, first_line(fmt))


@fmts
def test_style_preset_reason(fmt: Format) -> None:
    found = error(one(fmt, style_preset="FOO"), Codes.INVALID_ENUM, "style_preset", first_line(fmt))
    assert found.reason == "'FOO' is not one of the 62 style presets"


@fmts
def test_style_type_subset_per_provider(fmt: Format) -> None:
    outcome = one(fmt, provider="fal", style_type="render_3d")
    error(outcome, Codes.UNSUPPORTED_OPTION, "style_type", first_line(fmt))
    assert spec_of(one(fmt, provider="runware", style_type="render_3d")).style_type == "RENDER_3D"


# -- style code and references ------------------------------------------------------------


@fmts
def test_style_code(fmt: Format) -> None:
    assert spec_of(one(fmt, provider="runware", style_code="0123abCD")).style_code == "0123abCD"
    for bad in ("0123abc", "0123abcde", "0123abcg"):
        error(one(fmt, style_code=bad), Codes.INVALID_STYLE_CODE, "style_code", first_line(fmt))


@fmts
@pytest.mark.parametrize(
    "other", [{"style_type": "GENERAL"}, {"style_reference_images": ["https://a.example/s.png"]}]
)
def test_style_code_conflicts(fmt: Format, other: dict[str, Any]) -> None:
    outcome = one(fmt, provider="runware", style_code="0123abcd", **other)
    error(outcome, Codes.CONFLICTING_OPTIONS, "style_code", first_line(fmt))


@fmts
def test_style_reference_images(fmt: Format, image: Path) -> None:
    refs = ["https://a.example/1.png", "s3://b/2.png", "photo.jpg"]
    spec = spec_of(one(fmt, defaults(image.parent), style_reference_images=refs))
    assert spec.style_reference_images == ("https://a.example/1.png", "s3://b/2.png", str(image))


@fmts
def test_style_reference_images_at_most_four(fmt: Format) -> None:
    refs = [f"https://a.example/{n}.png" for n in range(5)]
    outcome = one(fmt, style_reference_images=refs)
    error(outcome, Codes.OUT_OF_RANGE, "style_reference_images", first_line(fmt))


@fmts
def test_style_reference_images_each_checked(fmt: Format) -> None:
    refs = ["https://a.example/1.png", "http://127.0.0.1/2.png"]
    outcome = one(fmt, style_reference_images=refs)
    found = error(outcome, Codes.PRIVATE_ADDRESS, "style_reference_images", first_line(fmt))
    assert found.reason.startswith("reference 2:")
    outcome = one(fmt, style_reference_images=["ftp://x/y"])
    error(outcome, Codes.INVALID_URL, "style_reference_images", first_line(fmt))


# -- colour palette -----------------------------------------------------------------------


@fmts
def test_color_palette_preset_and_members(fmt: Format) -> None:
    spec = spec_of(one(fmt, provider="fal", color_palette="ember"))
    assert spec.color_palette == ColorPalette(name="EMBER")
    spec = spec_of(one(fmt, provider="fal", color_palette="#ff0000:0.5|#00FF00"))
    assert spec.color_palette == ColorPalette(
        members=(PaletteMember(rgb=(255, 0, 0), weight=0.5), PaletteMember(rgb=(0, 255, 0)))
    )


def test_color_palette_as_a_json_list() -> None:
    line = {**BASE, "provider": "fal", "color_palette": ["#000000:1", "#ffffff:0.25"]}
    (outcome,) = read("jsonl", [line])
    members = spec_of(outcome).color_palette
    assert members is not None and members.members is not None
    assert [m.weight for m in members.members] == [1.0, 0.25]


@fmts
@pytest.mark.parametrize(
    ("palette", "code"),
    [
        ("NOT_A_PRESET", Codes.INVALID_VALUE),
        ("#ff0000|#zz0000", Codes.INVALID_VALUE),
        ("#ff0000:x", Codes.INVALID_VALUE),
        ("#ff0000:0", Codes.OUT_OF_RANGE),
        ("#ff0000:1.5", Codes.OUT_OF_RANGE),
        ("#ff0000:nan", Codes.OUT_OF_RANGE),
    ],
)
def test_color_palette_errors(fmt: Format, palette: str, code: str) -> None:
    error(one(fmt, provider="fal", color_palette=palette), code, "color_palette", first_line(fmt))


@fmts
def test_color_palette_is_fal_only(fmt: Format) -> None:
    outcome = one(fmt, provider="runware", color_palette="EMBER")
    found = error(outcome, Codes.UNSUPPORTED_OPTION, "color_palette", first_line(fmt))
    assert "color_palette is fal only" in found.reason


# -- numbers ------------------------------------------------------------------------------


@fmts
def test_seed(fmt: Format) -> None:
    assert spec_of(one(fmt, provider="fal", seed="42")).seed == 42
    line = first_line(fmt)
    error(one(fmt, provider="fal", seed="4.5"), Codes.INVALID_NUMBER, "seed", line)
    error(one(fmt, provider="fal", seed="-1"), Codes.OUT_OF_RANGE, "seed", line)
    error(one(fmt, provider="fal", seed=str(2**31)), Codes.OUT_OF_RANGE, "seed", line)
    error(one(fmt, provider="fal", seed="9" * 400), Codes.INVALID_NUMBER, "seed", line)
    error(one(fmt, provider="runware", seed="42"), Codes.UNSUPPORTED_OPTION, "seed", line)


def test_seed_json_number() -> None:
    (outcome,) = read("jsonl", [{**BASE, "provider": "fal", "seed": 7}])
    assert spec_of(outcome).seed == 7
    (outcome,) = read("jsonl", [{**BASE, "provider": "fal", "seed": True}])
    error(outcome, Codes.INVALID_NUMBER, "seed", 1)


@fmts
@pytest.mark.parametrize(
    ("provider", "good", "bad"), [("runware", 20, 21), ("fal", 8, 9), ("local", 1, 2)]
)
def test_num_results_per_provider(fmt: Format, provider: str, good: int, bad: int) -> None:
    assert spec_of(one(fmt, provider=provider, num_results=good)).num_results == good
    found = error(
        one(fmt, provider=provider, num_results=bad),
        Codes.OUT_OF_RANGE,
        "num_results",
        first_line(fmt),
    )
    if provider == "fal":
        assert found.reason == "9 is out of range 1-8 for provider fal"


@fmts
def test_num_results_must_be_a_positive_integer(fmt: Format) -> None:
    line = first_line(fmt)
    error(one(fmt, num_results="two"), Codes.INVALID_NUMBER, "num_results", line)
    error(one(fmt, num_results="0"), Codes.OUT_OF_RANGE, "num_results", line)


@fmts
def test_output_quality(fmt: Format) -> None:
    assert spec_of(one(fmt, output_quality="20")).output_quality == 20
    assert spec_of(one(fmt, output_quality="99")).output_quality == 99
    line = first_line(fmt)
    error(one(fmt, output_quality="19"), Codes.OUT_OF_RANGE, "output_quality", line)
    error(one(fmt, output_quality="100"), Codes.OUT_OF_RANGE, "output_quality", line)
    error(one(fmt, output_quality="high"), Codes.INVALID_NUMBER, "output_quality", line)


# -- background and shadow ----------------------------------------------------------------


@fmts
def test_background_colours(fmt: Format) -> None:
    assert spec_of(one(fmt, background="#FFFFFF")).background == "#FFFFFF"
    assert spec_of(one(fmt, background="#ffffff,#000000")).background == "#ffffff,#000000"
    line = first_line(fmt)
    error(one(fmt, background="#fff"), Codes.INVALID_VALUE, "background", line)
    error(one(fmt, background="#000000,#111111,#222222"), Codes.INVALID_VALUE, "background", line)


@fmts
def test_background_image(fmt: Format, image: Path) -> None:
    d = defaults(image.parent)
    assert spec_of(one(fmt, d, background="photo.jpg")).background == str(image)
    assert spec_of(one(fmt, d, background=URL)).background == URL
    error(
        one(fmt, d, background="missing.jpg"), Codes.FILE_NOT_FOUND, "background", first_line(fmt)
    )
    outcome = one(fmt, d, background="http://192.168.0.1/bg.jpg")
    error(outcome, Codes.PRIVATE_ADDRESS, "background", first_line(fmt))


@fmts
@pytest.mark.parametrize(
    ("given", "expected"),
    [("true", True), ("Yes", True), ("1", True), ("FALSE", False), ("no", False)],
)
def test_shadow(fmt: Format, given: str, expected: bool) -> None:
    assert spec_of(one(fmt, shadow=given)).shadow is expected


@fmts
def test_shadow_refuses_other_words(fmt: Format) -> None:
    error(one(fmt, shadow="maybe"), Codes.INVALID_VALUE, "shadow", first_line(fmt))


def test_shadow_json_boolean() -> None:
    (outcome,) = read("jsonl", [{**BASE, "shadow": False}])
    assert spec_of(outcome).shadow is False


# -- not given, defaults, the local provider, meta ------------------------------------------


@fmts
def test_empty_values_mean_not_given_and_set_defaults_apply(fmt: Format) -> None:
    d = defaults(values={"output_format": "png", "seed": "5"})
    spec = spec_of(one(fmt, d, output_format="", seed=None, rendering_speed=""))
    assert (spec.output_format, spec.seed, spec.rendering_speed) == ("PNG", 5, None)
    assert spec_of(one(fmt, d, output_format="webp")).output_format == "WEBP"


def test_null_means_not_given_in_jsonl() -> None:
    d = defaults(values={"output_quality": "80"})
    (outcome,) = read("jsonl", [{**BASE, "output_quality": None, "seed": None}], d)
    assert spec_of(outcome).output_quality == 80


@fmts
def test_set_default_errors_are_reported_per_row(fmt: Format) -> None:
    d = defaults(values={"seed": "5"}, provider="runware")
    error(one(fmt, d), Codes.UNSUPPORTED_OPTION, "seed", first_line(fmt))


@fmts
def test_local_provider_ignores_generative_options(fmt: Format) -> None:
    outcome = one(fmt, style_type="ANIME", color_palette="#102030", seed="3", provider="local")
    spec = spec_of(outcome)
    assert (spec.style_type, spec.seed) == ("ANIME", 3)


@fmts
def test_other_columns_go_to_meta(fmt: Format) -> None:
    spec = spec_of(one(fmt, brand="Acme", sku_group="shoes"))
    assert spec.meta == {"brand": "Acme", "sku_group": "shoes"}


def test_jsonl_meta_values_are_json_encoded() -> None:
    line = {**BASE, "tags": ["a", "b"], "count": 3, "flag": True, "extra": {"k": 1}, "none": None}
    (outcome,) = read("jsonl", [line])
    assert spec_of(outcome).meta == {
        "tags": '["a","b"]',
        "count": "3",
        "flag": "true",
        "extra": '{"k":1}',
        "none": "",
    }
    assert outcome.raw["tags"] == '["a","b"]'


@pytest.mark.parametrize("column", ["id", "image", "prompt", "seed", "style_type", "output"])
def test_jsonl_object_where_text_is_expected(column: str) -> None:
    (outcome,) = read("jsonl", [{**BASE, "provider": "fal", column: {"nested": "x"}}])
    error(outcome, Codes.INVALID_VALUE, column, 1)


def test_jsonl_numbers_as_text() -> None:
    """Option values may be numbers; ids may not (tests/test_untrusted.py: one id, one row)."""
    rows = [{**BASE, "id": "123", "style_code": 12345678, "provider": "runware"}]
    (outcome,) = read("jsonl", rows)
    spec = spec_of(outcome)
    assert (spec.id, spec.style_code, outcome.row_id) == ("123", "12345678", "123")


def test_validate_row_directly() -> None:
    result = validate_row({**BASE, "seed": "x"}, line=7, defaults=defaults())
    assert result == [FieldError(7, "seed", Codes.INVALID_NUMBER, "'x' is not an integer")]
    assert isinstance(validate_row(BASE, line=1, defaults=defaults()), JobSpec)


# -- --set ---------------------------------------------------------------------------------


def test_parse_set_options(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(image.parent)
    values = parse_set_options(
        [
            "seed=4",
            "output_format = jpeg",
            "background=photo.jpg",
            "style_reference_images=photo.jpg",
        ]
    )
    assert values == {
        "seed": "4",
        "output_format": "jpeg",
        "background": str(image),
        "style_reference_images": str(image),
    }


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("seed", "NAME=VALUE"),
        ("id=x", "not an option column"),
        ("prompt=x", "not an option column"),
        ("image=x", "not an option column"),
        ("colour=red", "not an option column"),
        ("seed=abc", "--set seed: 'abc' is not an integer"),
        ("style_preset=FOO", "--set style_preset: 'FOO' is not one of the 62 style presets"),
        ("num_results=21", "--set num_results"),
        ("provider=dalle", "--set provider"),
        ("shadow=", "empty value"),
    ],
)
def test_parse_set_options_errors(item: str, fragment: str) -> None:
    with pytest.raises(UsageError, match="--set") as info:
        parse_set_options([item])
    assert fragment in str(info.value)


# -- reading ------------------------------------------------------------------------------


def test_csv_multiline_field_line_numbers() -> None:
    data = (
        b"id,image,prompt\n"
        b'a,https://x.example/a.jpg,"first\nsecond\nthird"\n'
        b"\n"
        b"b,https://x.example/b.jpg,plain\n"
        b'c,https://x.example/c.jpg,"x\r\ny"\r\n'
        b"d,,p\n"
    )
    outcomes = read_bytes("csv", data)
    assert [(o.index, o.line, o.row_id) for o in outcomes] == [
        (0, 2, "a"),
        (1, 6, "b"),
        (2, 7, "c"),
        (3, 9, "d"),
    ]
    assert outcomes[0].spec is not None and outcomes[0].spec.prompt == "first\nsecond\nthird"
    error(outcomes[3], Codes.MISSING_FIELD, "image", 9)


def test_csv_extra_and_missing_fields() -> None:
    data = (
        b"id,image,prompt\n"
        b"a,https://x.example/a.jpg,p,surplus\n"
        b"b,https://x.example/b.jpg,p,,\n"
        b"c,https://x.example/c.jpg\n"
    )
    outcomes = read_bytes("csv", data)
    error(outcomes[0], Codes.EXTRA_FIELDS, ROW, 2)
    assert outcomes[1].ok  # empty trailing fields (spreadsheet exports) are harmless
    error(outcomes[2], Codes.MISSING_FIELD, "prompt", 4)
    assert outcomes[2].raw["prompt"] == ""


def test_csv_rows_of_only_commas_are_skipped() -> None:
    data = b"id,image,prompt\na,https://x.example/a.jpg,p\n,,\n , ,\n"
    assert len(read_bytes("csv", data)) == 1


def test_csv_header_is_stripped_and_trailing_empty_names_dropped() -> None:
    data = b" id , image ,prompt,,\na,https://x.example/a.jpg,p,,\n"
    (outcome,) = read_bytes("csv", data)
    assert spec_of(outcome).id == "a"


@fmts
def test_bom_is_skipped(fmt: Format) -> None:
    data = b"\xef\xbb\xbf" + encode(fmt, [BASE])
    (outcome,) = read_bytes(fmt, data)
    assert spec_of(outcome).id == "sku-1"


def test_jsonl_blank_lines_and_invalid_lines() -> None:
    data = (
        b'{"id": "a", "image": "https://x.example/a.jpg", "prompt": "p"}\n'
        b"\n   \n"
        b'{"id": "b", "image": broken\n'
        b'["not", "an", "object"]\n'
        b'{"id": "c", "image": "https://x.example/c.jpg", "prompt": "p"}'
    )
    outcomes = read_bytes("jsonl", data)
    assert [(o.index, o.line, o.row_id, o.ok) for o in outcomes] == [
        (0, 1, "a", True),
        (1, 4, "b", False),
        (2, 5, None, False),
        (3, 6, "c", True),
    ]
    found = error(outcomes[1], Codes.INVALID_JSON, ROW, 4)
    assert "column" in found.reason
    error(outcomes[2], Codes.INVALID_JSON, ROW, 5)


def test_jsonl_lone_surrogate_is_a_row_error() -> None:
    data = encode("jsonl", [BASE]) + b'{"id": "x\\ud800", "image": "i", "prompt": "p"}\n'
    outcomes = read_bytes("jsonl", data)
    error(outcomes[1], Codes.INVALID_JSON, ROW, 2)
    pair = (
        encode("jsonl", [BASE])
        + b'{"id": "x\\ud83d\\ude00", "image": "'
        + URL.encode()
        + b'", "prompt": "p"}\n'
    )
    assert read_bytes("jsonl", pair)[1].row_id == "x\U0001f600"


@fmts
def test_undecodable_bytes_later_are_a_row_error(fmt: Format) -> None:
    rows = [BASE, {**BASE, "id": "two"}, {**BASE, "id": "three", "image": "https://x.example/BAD"}]
    data = encode(fmt, [*rows, {**BASE, "id": "four"}]).replace(b"BAD", b"\xff\xfe")
    outcomes = read_bytes(fmt, data)
    assert [o.ok for o in outcomes] == [True, True, False, True]
    found = error(outcomes[2], Codes.INVALID_VALUE, ROW, first_line(fmt) + 2)
    assert "UTF-8" in found.reason
    assert outcomes[2].row_id == "three"


def test_malformed_csv_record_is_a_row_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from producer import manifest

    limit = csv.field_size_limit()
    monkeypatch.setattr(manifest, "_CSV_FIELD_LIMIT", 100)
    csv.field_size_limit(100)
    try:
        data = (
            b"id,image,prompt\n"
            b"a,https://x.example/a.jpg,p\n"
            b"b,https://x.example/b.jpg," + b"x" * 200 + b"\n"
            b"c,https://x.example/c.jpg,p\n"
        )
        outcomes = read_bytes("csv", data)
    finally:
        csv.field_size_limit(limit)
    assert [(o.line, o.ok) for o in outcomes] == [(2, True), (3, False), (4, True)]
    found = error(outcomes[1], Codes.INVALID_VALUE, ROW, 3)
    assert "malformed CSV" in found.reason


class _Pipe(io.RawIOBase):
    """A non-seekable byte stream, like standard input from a pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._data.read(min(len(buffer), 7))  # short reads, as from a pipe
        buffer[: len(chunk)] = chunk
        return len(chunk)


@fmts
def test_stdin_like_stream(fmt: Format) -> None:
    stream = io.BufferedReader(_Pipe(encode(fmt, [BASE, {**BASE, "id": "b"}])))
    assert not stream.seekable()
    head = stream.peek(4096)
    assert detect_format("-", head, None) == fmt
    outcomes = list(read_manifest(stream, fmt, defaults()))
    assert [o.row_id for o in outcomes] == ["sku-1", "b"]


# -- unreadable manifests -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "data", "fragment"),
    [
        ("csv", b"", "empty"),
        ("csv", b"\n\n  \n", "empty"),
        ("jsonl", b"", "empty"),
        ("jsonl", b"\n \n", "empty"),
        ("csv", b"sku,image,prompt\na,b,c\n", "no 'id' column"),
        ("csv", b"id,picture,prompt\na,b,c\n", "no 'image' column"),
        ("csv", b"id;image;prompt\na;b;c\n", "commas"),
        ("csv", b'{"id": "a", "image": "b"}\n', "--format jsonl"),
        ("csv", b"id,image,id\na,b,c\n", "duplicate column 'id'"),
        ("csv", b"id,,image\na,b,c\n", "column 2 has no name"),
        ("csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not UTF-8"),
        ("csv", b"id,image\x00,prompt\n", "NUL"),
        ("jsonl", b"\xff\xfe{\x00", "UTF-16"),
        ("csv", b"\xc3\x28id,image\n", "not UTF-8"),
        ("jsonl", b"\x1f\x8b\x08\x00\xff\xff", "binary data (NUL bytes)"),
        ("csv", b"\n\xffid,image\n", "not UTF-8"),
        ("jsonl", b"[1, 2]\n", "expected a JSON object, got an array"),
        ("jsonl", b'\n\n"text"\n', "line 3"),
        ("jsonl", b"id,image,prompt\n", "line 1"),
    ],
)
def test_not_a_manifest(fmt: Format, data: bytes, fragment: str) -> None:
    with pytest.raises(ManifestUnreadable) as info:
        read_manifest(io.BytesIO(data), fmt, defaults())  # raised by the call itself
    message = str(info.value)
    assert fragment in message or fragment.lower() in message.lower()
    assert "\n" not in message


def test_binary_garbage_without_newlines_is_refused_early() -> None:
    garbage = bytes(range(128, 256)) * 10_000
    with pytest.raises(ManifestUnreadable, match="not UTF-8"):
        read_manifest(io.BytesIO(garbage), "csv", defaults())


# -- format detection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "head", "explicit", "expected"),
    [
        ("rows.csv", b"{", None, "csv"),
        ("rows.CSV", b"", None, "csv"),
        ("rows.jsonl", b"id,image", None, "jsonl"),
        ("rows.ndjson", b"", None, "jsonl"),
        ("rows.csv", b"", "jsonl", "jsonl"),
        ("rows.txt", b"", "CSV", "csv"),
        ("-", b'\n  {"id": 1}', None, "jsonl"),
        ("-", b"\xef\xbb\xbfid,image,prompt\r\n", None, "csv"),
        ("rows.txt", b"id,image\na,b\n", None, "csv"),
        ("-", b'{"id": "\xc3', None, "jsonl"),  # a character cut by the end of the head
        ("-", b"id,image\na,\xff\x00\n", None, "csv"),  # a bad row later is the row's problem
    ],
)
def test_detect_format(name: str, head: bytes, explicit: str | None, expected: str) -> None:
    assert detect_format(name, head, explicit) == expected


@pytest.mark.parametrize(
    "head", [b"", b"\n \n", b"\x00\x01\x02", b"\xff\xd8\xff\xe0", b"[{}]", b"hello world\n"]
)
def test_detect_format_refuses(head: bytes) -> None:
    with pytest.raises(ManifestUnreadable):
        detect_format("-", head, None)


def test_detect_format_bad_explicit() -> None:
    with pytest.raises(UsageError):
        detect_format("rows.csv", b"", "xml")
