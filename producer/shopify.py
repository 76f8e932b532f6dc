"""Shopify product webhooks -> manifest rows (pure: no I/O but reading the mapping file).

A ``products/create`` or ``products/update`` payload carries the product and its
images; each image becomes one manifest row:

    id     = "{product id}-{image id}"
    image  = the image's ``src`` (https only)
    prompt = the mapping's template, with {title}, {product_type}, {vendor}, {handle},
             {tags}, {product_id}, {image_id}, {alt}, {position} filled in
    + the mapping's options (manifest option columns such as rendering_speed)

The mapping (``BGSWAP_SHOPIFY_MAPPING``: a TOML file's path, or inline JSON):

    prompt = "the {product_type} {title} by {vendor} on a sunlit marble counter"
    provider = "runware"                 # optional
    output = "s3://catalog/swapped/"     # optional: the batch's --output
    [options]                            # optional: option columns for every row
    rendering_speed = "QUALITY"
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

TOPICS = frozenset({"products/create", "products/update"})
FIELDS = ("title", "product_type", "vendor", "handle", "tags", "product_id", "image_id",
          "alt", "position")  # fmt: skip
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


class MappingError(ValueError):
    """A mapping that cannot be used (names the problem in one line)."""


class PayloadError(ValueError):
    """A payload that is not a Shopify product."""


@dataclass(frozen=True)
class Mapping:
    prompt: str
    provider: str | None = None
    output: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise MappingError("the Shopify mapping needs a non-empty 'prompt' template")
        for match in _PLACEHOLDER.finditer(self.prompt):
            name = match.group(1)
            if name is not None and name not in FIELDS:
                raise MappingError(
                    f"the Shopify mapping's prompt uses {{{name}}}: one of {', '.join(FIELDS)}"
                )
        reserved = {"id", "image", "prompt", "provider"} & set(self.options)
        if reserved:
            raise MappingError(f"the Shopify mapping's options cannot set {sorted(reserved)}")


def parse_mapping(data: Any) -> Mapping:
    if not isinstance(data, dict):
        raise MappingError("the Shopify mapping must be a table (TOML) or an object (JSON)")
    unknown = set(data) - {"prompt", "provider", "output", "options"}
    if unknown:
        raise MappingError(f"the Shopify mapping has unknown keys: {', '.join(sorted(unknown))}")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise MappingError("the Shopify mapping's 'options' must be a table of name = value")
    for key in ("provider", "output"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise MappingError(f"the Shopify mapping's {key!r} must be a string")
    return Mapping(
        prompt=data.get("prompt", ""),
        provider=data.get("provider"),
        output=data.get("output"),
        options={str(k): _text(v) for k, v in options.items()},
    )


def load_mapping(value: str | None) -> Mapping:
    """The mapping from BGSWAP_SHOPIFY_MAPPING: inline JSON (starts with '{'), else a path
    to a TOML file (.json files are read as JSON)."""
    if not value or not value.strip():
        raise MappingError("BGSWAP_SHOPIFY_MAPPING is not set")
    text = value.strip()
    try:
        if text.startswith("{"):
            return parse_mapping(json.loads(text))
        path = Path(text)
        raw = path.read_text(encoding="utf-8")
        return parse_mapping(json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw))
    except (OSError, ValueError) as exc:
        if isinstance(exc, MappingError):
            raise
        raise MappingError(f"BGSWAP_SHOPIFY_MAPPING: {exc}") from None


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    return str(value)


def render(template: str, values: dict[str, str]) -> str:
    """Fill ``{name}`` from ``values`` ({{ and }} are literal braces)."""

    def one(match: re.Match[str]) -> str:
        whole = match.group(0)
        if whole in ("{{", "}}"):
            return whole[0]
        return values.get(match.group(1), "")

    return _PLACEHOLDER.sub(one, template).strip()


def _product_fields(product: dict[str, Any]) -> dict[str, str]:
    tags = product.get("tags") or ""
    return {
        "title": str(product.get("title") or ""),
        "product_type": str(product.get("product_type") or ""),
        "vendor": str(product.get("vendor") or ""),
        "handle": str(product.get("handle") or ""),
        "tags": ", ".join(tags) if isinstance(tags, list) else str(tags),
        "product_id": str(product["id"]),
    }


def _image_src(image: dict[str, Any]) -> str | None:
    src = image.get("src")
    if not isinstance(src, str):
        return None
    parts = urlsplit(src.strip())
    return src.strip() if parts.scheme == "https" and parts.hostname else None


def product_rows(product: Any, mapping: Mapping) -> list[dict[str, str]]:
    """One manifest row per image of a product payload (images without an https src are
    left out); rows in the product's image order (``position``)."""
    if not isinstance(product, dict) or not isinstance(product.get("id"), int | str):
        raise PayloadError("not a Shopify product: no id")
    images = product.get("images") or []
    if not isinstance(images, list):
        raise PayloadError("not a Shopify product: images is not a list")
    fields = _product_fields(product)
    good = [i for i in images if isinstance(i, dict) and i.get("id") is not None]
    good.sort(key=lambda i: (int(i.get("position") or 0), str(i["id"])))
    rows: list[dict[str, str]] = []
    for image in good:
        src = _image_src(image)
        if src is None:
            continue
        values = {
            **fields,
            "image_id": str(image["id"]),
            "alt": str(image.get("alt") or ""),
            "position": str(image.get("position") or ""),
        }
        row = {
            "id": f"{fields['product_id']}-{image['id']}",
            "image": src,
            "prompt": render(mapping.prompt, values),
            **mapping.options,
        }
        if mapping.provider:
            row["provider"] = mapping.provider
        rows.append(row)
    return rows


def batch_body(product: Any, mapping: Mapping) -> dict[str, Any]:
    """The body of a ``POST /v1/batches`` for the product: its rows, and the mapping's
    provider and output when it names them."""
    body: dict[str, Any] = {"rows": product_rows(product, mapping)}
    if mapping.provider:
        body["provider"] = mapping.provider
    if mapping.output:
        body["output"] = mapping.output
    return body
