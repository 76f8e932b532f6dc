"""The fingerprint of a row (worker/fingerprint.py): what changes it, and what does not."""

from __future__ import annotations

from typing import Any

import pytest

from worker.fingerprint import (
    NOT_OPTIONS,
    by_content,
    entry_outputs,
    fingerprint,
    index_entry,
    index_location,
    indexable,
    references,
    skipped_record,
    staged_prefix,
)
from worker.jobs import ColorPalette, JobSpec, PaletteMember

SOURCE = "a" * 64
MODEL = "ideogram:4@5"


def spec(**fields: Any) -> JobSpec:
    base: dict[str, Any] = {"id": "sku-1", "image": "/data/p.png", "prompt": "a marble counter"}
    return JobSpec(**{**base, **fields})


def fp(s: JobSpec, source: str = SOURCE, model: str = MODEL, **digests: str) -> str:
    return fingerprint(s, source, model, digests)


# One changed value per option field of JobSpec: each must change the fingerprint.
OPTION_CHANGES: dict[str, Any] = {
    "rendering_speed": "QUALITY",
    "magic_prompt": "OFF",
    "style_type": "REALISTIC",
    "style_preset": "EDITORIAL",
    "style_code": "0A1B2C3D",
    "style_reference_images": ("https://cdn.example.com/ref.png",),
    "color_palette": ColorPalette(members=(PaletteMember(rgb=(1, 2, 3), weight=0.5),)),
    "seed": 7,
    "num_results": 2,
    "output_format": "PNG",
    "output_quality": 80,
    "background": "#112233",
    "shadow": False,
}


def test_every_option_field_of_jobspec_is_covered_here() -> None:
    # A new JobSpec field is either an option (it changes the result) or named in NOT_OPTIONS.
    assert set(JobSpec.model_fields) - NOT_OPTIONS == set(OPTION_CHANGES)


@pytest.mark.parametrize("name", sorted(OPTION_CHANGES))
def test_each_option_changes_the_fingerprint(name: str) -> None:
    assert fp(spec(**{name: OPTION_CHANGES[name]})) != fp(spec())


def test_every_option_value_gives_its_own_fingerprint() -> None:
    prints = {fp(spec(rendering_speed=v)) for v in ("TURBO", "BALANCED", "QUALITY")}
    prints |= {fp(spec(num_results=n)) for n in (1, 2, 3)}
    assert len(prints) == 6


@pytest.mark.parametrize(
    ("change", "expect_same"),
    [
        ({"meta": {"category": "kitchen", "note": "x"}}, True),
        ({"image": "/elsewhere/moved.png"}, True),  # the bytes count, not the path
        ({"id": "sku-2"}, False),  # the default output key is made from the id
        ({"prompt": "a sunlit picnic"}, False),
        ({"provider": "runware"}, False),
        ({"output": "s3://bucket/out/sku-1.jpg"}, False),
    ],
)
def test_what_changes_the_fingerprint_and_what_does_not(
    change: dict[str, Any], expect_same: bool
) -> None:
    assert (fp(spec(**change)) == fp(spec())) is expect_same


def test_the_source_bytes_and_the_model_change_it() -> None:
    assert fp(spec(), source="b" * 64) != fp(spec())
    assert fp(spec(), model="ideogram:4@6") != fp(spec())


def test_a_fingerprint_is_a_sha256_hex_and_stable() -> None:
    first = fp(spec(style_reference_images=("https://x/r.png",), seed=3))
    assert first == fp(spec(seed=3, style_reference_images=("https://x/r.png",)))
    assert len(first) == 64 and int(first, 16) >= 0


def test_reference_images_by_content_are_named_by_their_digest() -> None:
    local = spec(style_reference_images=("/data/ref.png",), background="/data/bg.png")
    staged = spec(
        style_reference_images=("s3://b/out/B2/_sources/sku-1-style1.png",),
        background="s3://b/out/B2/_sources/sku-1-background.png",
    )
    digests_local = {"/data/ref.png": "1" * 64, "/data/bg.png": "2" * 64}
    digests_staged = {
        "s3://b/out/B2/_sources/sku-1-style1.png": "1" * 64,
        "s3://b/out/B2/_sources/sku-1-background.png": "2" * 64,
    }
    # The producer's local paths and a worker's staged copies: the same work.
    assert fingerprint(local, SOURCE, MODEL, digests_local) == fingerprint(
        staged, SOURCE, MODEL, digests_staged
    )
    changed = {**digests_local, "/data/bg.png": "3" * 64}
    assert fingerprint(local, SOURCE, MODEL, changed) != fingerprint(
        local, SOURCE, MODEL, digests_local
    )


def test_which_references_are_identified_by_content() -> None:
    prefix = staged_prefix("s3://b/out/", "B2")
    assert prefix == "s3://b/out/B2/_sources/"
    assert by_content("/data/ref.png") and by_content("data:image/png;base64,AAAA")
    assert by_content("s3://b/out/B2/_sources/x.png", prefix)
    assert not by_content("s3://b/out/B1/_sources/x.png", prefix)
    assert not by_content("https://cdn.example.com/r.png", prefix)
    assert references(spec(style_reference_images=("/a.png", "/b.png"), background="#fff000")) == [
        ("style_reference_images[0]", "/a.png"),
        ("style_reference_images[1]", "/b.png"),
    ]
    assert references(spec(background="/bg.png")) == [("background", "/bg.png")]


def test_presigned_outputs_are_never_indexed() -> None:
    assert indexable(spec()) and indexable(spec(output="s3://b/k.jpg"))
    assert not indexable(spec(output="https://b.s3.amazonaws.com/k.jpg?X-Amz-Signature=s"))


def test_index_entries_are_checked_before_they_are_believed() -> None:
    key = fp(spec())
    assert index_location("s3://b/out/", key) == f"s3://b/out/_index/{key[:2]}/{key}.json"
    record = {
        "provider": "local",
        "model": "bgswap-local-1",
        "outputs": [{"url": "/out/B1/sku-1.jpg", "bytes": 10}],
        "finished_at": "2026-01-01T00:00:00+00:00",
    }
    entry = index_entry(key, spec(), record, "B1")
    assert entry_outputs(entry, key) == record["outputs"]
    assert entry_outputs(entry, "f" * 64) is None  # another fingerprint's entry
    assert entry_outputs({**entry, "v": 2}, key) is None
    assert entry_outputs({**entry, "outputs": []}, key) is None
    assert entry_outputs({**entry, "outputs": [{"url": "https://h/k?sig=1"}]}, key) is None
    assert entry_outputs("not an object", key) is None
    skipped = skipped_record(entry, spec(), key, "bgswap-local-1", "now")
    assert skipped["status"] == "skipped" and skipped["cost_usd"] == 0.0
    assert skipped["outputs"] == record["outputs"] and skipped["error"] is None
