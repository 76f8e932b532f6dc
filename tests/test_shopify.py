"""producer/shopify.py: a product webhook's images -> manifest rows through the mapping."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from producer.shopify import (
    Mapping,
    MappingError,
    PayloadError,
    batch_body,
    load_mapping,
    product_rows,
    render,
)


def product_payload() -> dict[str, Any]:
    """A products/create payload shaped like Shopify's (REST Admin API 2024-10)."""
    return {
        "admin_graphql_api_id": "gid://shopify/Product/788032119674292922",
        "body_html": "An example T-Shirt",
        "created_at": "2026-11-30T10:12:08-05:00",
        "handle": "example-t-shirt",
        "id": 788032119674292922,
        "product_type": "Shirts",
        "published_at": "2026-11-30T10:12:08-05:00",
        "template_suffix": None,
        "title": "Example T-Shirt",
        "updated_at": "2026-11-30T10:12:08-05:00",
        "vendor": "Acme",
        "status": "active",
        "published_scope": "web",
        "tags": "example, mens, t-shirt",
        "variants": [
            {"id": 642667041472713922, "product_id": 788032119674292922, "title": "Small",
             "price": "19.99", "sku": "example-shirt-s", "image_id": None},
        ],
        "options": [{"id": 527050010214937811, "name": "Title", "position": 1, "values": ["Small"]}],
        "images": [
            {"id": 539438707724640966, "product_id": 788032119674292922, "position": 2,
             "alt": "back", "width": 1200, "height": 1200,
             "src": "https://cdn.shopify.com/s/files/1/0005/4838/0009/products/shirt-back.jpg?v=1"},
            {"id": 539438707724640965, "product_id": 788032119674292922, "position": 1,
             "alt": "front", "width": 1200, "height": 1200,
             "src": "https://cdn.shopify.com/s/files/1/0005/4838/0009/products/shirt.jpg?v=1"},
            {"id": 539438707724640967, "product_id": 788032119674292922, "position": 3,
             "alt": None, "src": "http://insecure.example.com/shirt.jpg"},
        ],
        "image": {"id": 539438707724640965, "src": "https://cdn.shopify.com/s/files/1/shirt.jpg"},
    }  # fmt: skip


MAPPING = Mapping(
    prompt="the {product_type} {title} by {vendor} ({alt}) on a sunlit {{marble}} counter",
    provider="local",
    output="s3://catalog/swapped/",
    options={"rendering_speed": "QUALITY", "output_format": "PNG"},
)


def test_one_row_per_https_image_in_position_order() -> None:
    rows = product_rows(product_payload(), MAPPING)
    assert [r["id"] for r in rows] == [
        "788032119674292922-539438707724640965",
        "788032119674292922-539438707724640966",
    ]  # the http:// image is left out
    first = rows[0]
    assert (
        first["image"] == "https://cdn.shopify.com/s/files/1/0005/4838/0009/products/shirt.jpg?v=1"
    )
    assert (
        first["prompt"] == "the Shirts Example T-Shirt by Acme (front) on a sunlit {marble} counter"
    )
    assert first["provider"] == "local"
    assert first["rendering_speed"] == "QUALITY"
    assert first["output_format"] == "PNG"


def test_batch_body_names_provider_and_output() -> None:
    body = batch_body(product_payload(), MAPPING)
    assert body["provider"] == "local"
    assert body["output"] == "s3://catalog/swapped/"
    assert len(body["rows"]) == 2
    minimal = batch_body(product_payload(), Mapping(prompt="a {handle} on a beach"))
    assert set(minimal) == {"rows"}
    assert minimal["rows"][0]["prompt"] == "a example-t-shirt on a beach"
    assert "provider" not in minimal["rows"][0]


def test_tags_as_a_list_and_missing_fields() -> None:
    payload = {"id": 1, "tags": ["a", "b"], "images": [{"id": 2, "src": "https://x.test/a.png"}]}
    rows = product_rows(payload, Mapping(prompt="{title}|{tags}|{vendor}"))
    assert rows == [{"id": "1-2", "image": "https://x.test/a.png", "prompt": "|a, b|"}]


def test_a_product_without_images_has_no_rows() -> None:
    assert product_rows({"id": 5, "images": []}, MAPPING) == []
    assert product_rows({"id": 5}, MAPPING) == []


@pytest.mark.parametrize("payload", [None, [], {"title": "no id"}, {"id": 1, "images": "x"}])
def test_not_a_product(payload: Any) -> None:
    with pytest.raises(PayloadError):
        product_rows(payload, MAPPING)


def test_load_mapping_from_toml_json_file_and_inline_json(tmp_path: Path) -> None:
    toml = tmp_path / "mapping.toml"
    toml.write_text(
        'prompt = "a {title} on a beach"\nprovider = "runware"\noutput = "s3://b/p/"\n'
        '[options]\nrendering_speed = "TURBO"\nnum_results = 2\nshadow = false\n'
    )
    mapping = load_mapping(str(toml))
    assert mapping == Mapping(
        prompt="a {title} on a beach", provider="runware", output="s3://b/p/",
        options={"rendering_speed": "TURBO", "num_results": "2", "shadow": "false"},
    )  # fmt: skip
    as_json = tmp_path / "mapping.json"
    as_json.write_text(json.dumps({"prompt": "a {title}"}))
    assert load_mapping(str(as_json)) == Mapping(prompt="a {title}")
    assert load_mapping('{"prompt": "a {vendor}", "options": {"seed": 7}}') == Mapping(
        prompt="a {vendor}", options={"seed": "7"}
    )


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (None, "not set"),
        ('{"prompt": ""}', "non-empty"),
        ('{"prompt": "a {colour}"}', "{colour}"),
        ('{"prompt": "a", "colour": 1}', "unknown keys"),
        ('{"prompt": "a", "options": {"id": "x"}}', "cannot set"),
        ('{"prompt": "a", "options": 3}', "options"),
        ("{not json", "BGSWAP_SHOPIFY_MAPPING"),
        ("/nonexistent/mapping.toml", "BGSWAP_SHOPIFY_MAPPING"),
    ],
)
def test_bad_mappings_say_why(value: str | None, says: str) -> None:
    with pytest.raises(MappingError) as err:
        load_mapping(value)
    assert says in str(err.value)


def test_render_braces_and_unknown_names() -> None:
    assert render("{{x}} {a}", {"a": "1"}) == "{x} 1"
    assert render("{missing}", {}) == ""
