"""Pure validation of one manifest row: values in, a ``JobSpec`` or every ``FieldError`` out.

Each column has a small parser ``(value, defaults) -> parsed`` that raises ``InvalidField``;
``validate_row`` runs them all, collects every problem of the row, applies the provider's
caps (its ``SPEC.caps``, worker/providers/) and builds the ``JobSpec`` with pydantic only
at the end.
Nothing here does I/O beyond ``os.stat`` of local image paths (no DNS, no network).

Values come from CSV (always strings) or JSON Lines (strings, numbers, booleans, null,
lists). An empty string, whitespace, null or an empty list means "not given"; for an
option column the ``--set`` default then applies.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from string import Formatter
from typing import Any, TypeVar

from pydantic import ValidationError

from worker.errors import Codes, FieldError, redact_url
from worker.jobs import (
    ID_MAX_CHARS,
    MAX_STYLE_REFERENCES,
    PALETTE_PRESETS,
    PROMPT_MAX_CHARS,
    QUALITY_RANGE,
    SEED_RANGE,
    STYLE_PRESETS,
    STYLE_TYPES,
    ColorPalette,
    JobSpec,
    PaletteMember,
    ProviderCaps,
    parse_background,
    parse_hex_colour,
)
from worker.netguard import is_public_address
from worker.providers import SPECS

T = TypeVar("T")

# The column of errors that concern a whole row (bad JSON, extra CSV fields, bad bytes).
ROW = "(row)"

CORE_COLUMNS: tuple[str, ...] = ("id", "image", "prompt")
OPTION_COLUMNS: tuple[str, ...] = (
    "output", "provider", "rendering_speed", "magic_prompt", "style_type", "style_preset",
    "style_code", "style_reference_images", "color_palette", "seed", "num_results",
    "output_format", "output_quality", "background", "shadow",
)  # fmt: skip
KNOWN_COLUMNS: frozenset[str] = frozenset(CORE_COLUMNS + OPTION_COLUMNS)
_OPTION_SET = frozenset(OPTION_COLUMNS)

PROVIDER_CAPS = {name: spec.caps for name, spec in SPECS.items()}
PROVIDERS = tuple(SPECS)
MAX_RESULTS = max(caps.max_results for caps in PROVIDER_CAPS.values())


@dataclass(frozen=True)
class RowDefaults:
    """What the command line adds to every row, and where a row may read and write."""

    prompt: str | None = None  # --prompt TEMPLATE (used when the row's prompt is empty/missing)
    values: Mapping[str, str] = field(default_factory=dict)  # --set NAME=VALUE
    provider: str = "local"  # --provider, used when the row has no provider
    available_providers: frozenset[str] = frozenset({"local"})
    # Providers whose key is not set here -> the variable that would hold it.
    missing_keys: Mapping[str, str] = field(default_factory=dict)
    base_dir: Path = Path(".")  # relative local paths resolve against this
    allow_private_urls: bool = False
    # Folders a row's local paths may point into (after symlinks); empty: base_dir alone.
    local_roots: tuple[Path, ...] = ()
    # Where an ``output`` column's s3:// key may be (``s3://bucket/prefix``); empty: nowhere.
    output_prefixes: tuple[str, ...] = ()
    # Where rows without ``output`` go (``{--output}/{batch}``), for telling collisions.
    destination_root: str = ""
    # The largest manifest field (and line) the reader takes.
    max_field_bytes: int = 1 << 20
    # Whether AWS credentials are at hand for s3:// references (asked once, when needed).
    s3_credentials: Callable[[], bool] = field(default=lambda: True, compare=False)

    @cached_property
    def real_roots(self) -> tuple[str, ...]:
        """The folders local paths may point into, symlinks resolved (once per manifest)."""
        return tuple(os.path.realpath(root) for root in self.local_roots or (self.base_dir,))


class InvalidField(Exception):
    """One column's value is wrong: a stable code and a human reason (no line, no column)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


Parser = Callable[[object, RowDefaults], Any]


# -- values -------------------------------------------------------------------------------


def is_blank(value: object) -> bool:
    """Empty string, whitespace, null or an empty list: the column is not given."""
    if isinstance(value, str):
        return not value or value.isspace()
    return value is None or value == []


def as_text(value: object) -> str:
    """A value as text: strings as they are, null as "", anything else JSON-encoded."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    return "an object" if isinstance(value, dict) else "null"


def _text(value: object) -> str:
    """A scalar as text; a JSON object or list where text is expected is an error."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        raise InvalidField(Codes.INVALID_VALUE, "expected text, got a JSON object")
    if isinstance(value, list):
        raise InvalidField(Codes.INVALID_VALUE, "expected text, got a list")
    return as_text(value)


_INTEGER = re.compile(r"[+-]?[0-9]{1,19}")


def _integer(value: object, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise InvalidField(Codes.INVALID_NUMBER, f"{as_text(value)} is not an integer")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        number = value
    else:
        text = _text(value).strip()
        if not _INTEGER.fullmatch(text):
            raise InvalidField(Codes.INVALID_NUMBER, f"{text!r} is not an integer")
        number = int(text)
    if not low <= number <= high:
        raise InvalidField(Codes.OUT_OF_RANGE, f"{number} is out of range {low}-{high}")
    return number


def _enum(
    value: object, choices: frozenset[str], described: str, aliases: Mapping[str, str]
) -> str:
    given = _text(value).strip()
    key = given.upper()
    key = aliases.get(key, key)
    if key not in choices:
        raise InvalidField(Codes.INVALID_ENUM, f"{given!r} is not one of {described}")
    return key


# -- image references and URLs ------------------------------------------------------------

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)")
_BAD_HOST_CHAR = re.compile(r"[\s\\<>\"'`^{|}\x00-\x1f\x7f]")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_DATA_URI = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_IPV4_LIKE = re.compile(r"[0-9][0-9a-fA-Fx.]*")
_REF_KINDS = "http(s):// URL, s3://bucket/key, data:image/...;base64, or a local path"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_literal(host: str) -> IPAddress | None:
    """The address a host names without DNS: IPv6 literals and every IPv4 spelling that
    ``inet_aton`` (hence ``getaddrinfo``) accepts, such as ``127.1`` or ``2130706433``."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.partition("%")[0])
        except ValueError:
            return None
    if _IPV4_LIKE.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def is_private_host(host: str) -> bool:
    """``localhost`` (and ``*.localhost``) or a non-public IP literal; names are not resolved."""
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    ip = _ip_literal(host)
    # The same rule the worker applies to resolved addresses at connect time.
    return ip is not None and not is_public_address(ip)


def _http_host(text: str) -> str:
    """The lower-cased host of an ``http(s)://`` URL (a small parser: ``urlsplit`` costs
    several times as much, and every row has a URL or two)."""
    match = _AUTHORITY.match(text)
    authority = match.group(1) if match else ""
    hostport = authority.rpartition("@")[2]
    if hostport.startswith("["):
        host, bracket, port = hostport[1:].partition("]")
        if not bracket or (port and port[0] != ":"):
            raise InvalidField(Codes.INVALID_URL, f"{redact_url(text)} has a malformed IPv6 host")
        port = port[1:]
    else:
        host, _, port = hostport.partition(":")
        if "%" in host:
            raise InvalidField(Codes.INVALID_URL, f"{redact_url(text)} has a percent-encoded host")
    if port and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise InvalidField(Codes.INVALID_URL, f"{redact_url(text)} has an invalid port")
    if not host:
        raise InvalidField(Codes.INVALID_URL, f"{redact_url(text)} has no host")
    if _BAD_HOST_CHAR.search(host):
        raise InvalidField(Codes.INVALID_URL, f"{redact_url(text)} has an invalid host")
    return host.lower()


def _http_url(text: str, defaults: RowDefaults) -> str:
    host = _http_host(text)
    if not defaults.allow_private_urls and is_private_host(host):
        raise InvalidField(
            Codes.PRIVATE_ADDRESS,
            f"{host} is a local or private address (BGSWAP_ALLOW_PRIVATE_URLS=1 allows it)",
        )
    return text


def _s3_url(text: str, defaults: RowDefaults) -> str:
    bucket, _, key = text[5:].partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise InvalidField(Codes.INVALID_URL, f"{text!r} has no valid bucket: use s3://bucket/key")
    if not key:
        raise InvalidField(Codes.INVALID_URL, f"{text!r} has no key: use s3://bucket/key")
    if key.endswith("/"):
        raise InvalidField(Codes.INVALID_URL, f"{text!r} names a folder, not an object")
    if not defaults.s3_credentials():
        raise InvalidField(
            Codes.NO_CREDENTIALS,
            f"{text[:200]!r}: no AWS credentials on this machine to reach s3:// with "
            "(boto3 looks in the environment, ~/.aws and the instance's role)",
        )
    return text


def _data_uri(text: str) -> str:
    match = _DATA_URI.match(text)
    if match is None:
        raise InvalidField(Codes.INVALID_URL, "a data URI must be data:image/<type>;base64,<data>")
    payload = text[match.end() :]
    if len(payload) % 4 or not _BASE64.fullmatch(payload):
        raise InvalidField(Codes.INVALID_URL, "the data URI's payload is not valid base64")
    return text


def within(path: str, root: str) -> bool:
    """``path`` is ``root`` or below it (both absolute, symlinks already resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _local_file(text: str, defaults: RowDefaults) -> str:
    """An existing regular file under one of the row's roots, as its real path: symlinks
    and ``..`` are resolved first, so neither leads out, and nothing outside is opened."""
    path = os.path.expanduser(text) if text.startswith("~") else text
    try:
        real = os.path.realpath(os.path.join(defaults.base_dir, path))
    except (OSError, ValueError):
        raise InvalidField(Codes.FILE_NOT_FOUND, f"not a usable path: {text[:200]!r}") from None
    roots = defaults.real_roots
    if not any(within(real, root) for root in roots):
        raise InvalidField(
            Codes.PATH_OUTSIDE_ROOT,
            f"{text[:200]!r} is outside the folders a manifest may read ({', '.join(roots)}); "
            "BGSWAP_LOCAL_ROOTS adds folders",
        )
    try:
        mode = os.stat(real).st_mode
    except (OSError, ValueError):
        raise InvalidField(Codes.FILE_NOT_FOUND, f"no such file: {real}") from None
    if not stat.S_ISREG(mode):
        raise InvalidField(Codes.FILE_NOT_FOUND, f"not a regular file: {real}")
    return real


def parse_image_ref(value: object, defaults: RowDefaults) -> str:
    """A URL, ``s3://`` or ``data:`` reference as given, or a local file made absolute."""
    text = _text(value).strip()
    if not text:
        raise InvalidField(Codes.MISSING_FIELD, f"empty image reference: use an {_REF_KINDS}")
    scheme = _SCHEME.match(text)
    if scheme is not None:
        name = scheme.group(1).lower()
        if name in ("http", "https"):
            return _http_url(text, defaults)
        if name == "s3":
            return _s3_url(text, defaults)
        raise InvalidField(Codes.INVALID_URL, f"unsupported scheme {name}://: use an {_REF_KINDS}")
    if text[:5].lower() == "data:":
        return _data_uri(text)
    return _local_file(text, defaults)


# -- column parsers (provider-independent; shared with --set) ------------------------------


def parse_id(value: object, _defaults: RowDefaults) -> str:
    if not isinstance(value, str):
        # A JSON 123 and "123", or true and "true", would be one id: ids are strings.
        raise InvalidField(
            Codes.INVALID_VALUE, f"id must be a string, not {_kind(value)} (write it in quotes)"
        )
    text = value.strip()
    if len(text) > ID_MAX_CHARS:
        raise InvalidField(Codes.TOO_LONG, f"id is {len(text)} characters (at most {ID_MAX_CHARS})")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise InvalidField(Codes.INVALID_VALUE, "id is not valid Unicode") from None
    return text


def in_prefix(s3_url: str, prefix: str) -> bool:
    """``s3://bucket/key`` lies under ``s3://bucket[/prefix]`` (whole segments only)."""
    bucket, _, key = s3_url[5:].partition("/")
    want_bucket, _, want_key = prefix[5:].partition("/")
    want_key = want_key.strip("/")
    if bucket != want_bucket:
        return False
    return not want_key or key == want_key or key.startswith(want_key + "/")


def parse_output(value: object, defaults: RowDefaults) -> str:
    """A presigned http(s) URL (it carries its own authority, and is address-checked), or
    ``s3://bucket/key`` inside ``--output`` or a prefix of BGSWAP_OUTPUT_PREFIXES."""
    text = _text(value).strip()
    scheme = _SCHEME.match(text)
    name = scheme.group(1).lower() if scheme else ""
    if name in ("http", "https"):
        return _http_url(text, defaults)
    if name != "s3":
        raise InvalidField(
            Codes.INVALID_URL,
            f"{redact_url(text)!r} is not a presigned http(s):// URL or s3://bucket/key",
        )
    _s3_url(text, defaults)
    segments = text[5:].split("/")[1:]
    if any(part in ("", ".", "..") for part in segments):
        raise InvalidField(
            Codes.INVALID_URL, f"{text[:200]!r}: empty, '.' or '..' parts are not allowed in a key"
        )
    if not any(in_prefix(text, prefix) for prefix in defaults.output_prefixes):
        allowed = ", ".join(defaults.output_prefixes) or "none: --output is a local folder"
        raise InvalidField(
            Codes.OUTPUT_OUTSIDE_PREFIX,
            f"{text[:200]!r} is outside the destinations rows may write ({allowed}); "
            "BGSWAP_OUTPUT_PREFIXES adds some",
        )
    return text


def parse_provider(value: object, _defaults: RowDefaults) -> str:
    given = _text(value).strip()
    name = given.lower()
    if name not in PROVIDERS:
        raise InvalidField(Codes.INVALID_ENUM, f"{given!r} is not one of {', '.join(PROVIDERS)}")
    return name


_SPEEDS = frozenset({"TURBO", "BALANCED", "QUALITY"})
_MAGIC = frozenset({"AUTO", "ON", "OFF"})
_FORMATS = frozenset({"JPG", "PNG", "WEBP"})
_STYLE_TYPES = frozenset(STYLE_TYPES)
_PRESETS = frozenset(STYLE_PRESETS)
_PALETTES = frozenset(PALETTE_PRESETS)
_NO_ALIASES: Mapping[str, str] = {}


def parse_rendering_speed(value: object, _defaults: RowDefaults) -> str:
    # Runware calls BALANCED "DEFAULT".
    return _enum(value, _SPEEDS, "TURBO, BALANCED, QUALITY", {"DEFAULT": "BALANCED"})


def parse_magic_prompt(value: object, _defaults: RowDefaults) -> str:
    # fal's expand_prompt is a boolean: accept true/false as ON/OFF.
    return _enum(value, _MAGIC, "AUTO, ON, OFF", {"TRUE": "ON", "FALSE": "OFF"})


def parse_style_type(value: object, _defaults: RowDefaults) -> str:
    return _enum(value, _STYLE_TYPES, ", ".join(STYLE_TYPES), _NO_ALIASES)


def parse_style_preset(value: object, _defaults: RowDefaults) -> str:
    given = _text(value).strip()
    key = given.upper().replace(" ", "_").replace("-", "_")
    if key not in _PRESETS:
        raise InvalidField(
            Codes.INVALID_ENUM, f"{given!r} is not one of the {len(STYLE_PRESETS)} style presets"
        )
    return key


def parse_output_format(value: object, _defaults: RowDefaults) -> str:
    return _enum(value, _FORMATS, "JPG, PNG, WEBP", {"JPEG": "JPG"})


_STYLE_CODE = re.compile(r"[0-9A-Fa-f]{8}")


def parse_style_code(value: object, _defaults: RowDefaults) -> str:
    text = _text(value).strip()
    if not _STYLE_CODE.fullmatch(text):
        raise InvalidField(Codes.INVALID_STYLE_CODE, f"{text!r} is not 8 hex characters")
    return text


def parse_style_references(value: object, defaults: RowDefaults) -> tuple[str, ...]:
    """1-4 image references: a list (JSON Lines) or text separated by ``|``."""
    items: list[object] = list(value) if isinstance(value, list) else list(_text(value).split("|"))
    if len(items) > MAX_STYLE_REFERENCES:
        raise InvalidField(
            Codes.OUT_OF_RANGE,
            f"{len(items)} style reference images (at most {MAX_STYLE_REFERENCES})",
        )
    refs: list[str] = []
    for number, item in enumerate(items, 1):
        try:
            if is_blank(item):
                raise InvalidField(Codes.INVALID_VALUE, "empty")
            refs.append(parse_image_ref(item, defaults))
        except InvalidField as exc:
            raise InvalidField(exc.code, f"reference {number}: {exc.reason}") from None
    return tuple(refs)


def _palette_member(item: object, number: int) -> PaletteMember:
    colour, colon, weight_text = _text(item).strip().partition(":")
    try:
        rgb = parse_hex_colour(colour)
    except ValueError as exc:
        raise InvalidField(Codes.INVALID_VALUE, f"member {number}: {exc}") from None
    if not colon:
        return PaletteMember(rgb=rgb)
    try:
        weight = float(weight_text)
    except ValueError:
        raise InvalidField(
            Codes.INVALID_VALUE, f"member {number}: weight {weight_text!r} is not a number"
        ) from None
    if not 0 < weight <= 1:
        raise InvalidField(
            Codes.OUT_OF_RANGE, f"member {number}: weight {weight_text.strip()} is not in (0, 1]"
        )
    return PaletteMember(rgb=rgb, weight=weight)


def _palette_preset(text: str) -> ColorPalette:
    name = text.strip().upper()
    if name not in _PALETTES:
        raise InvalidField(
            Codes.INVALID_VALUE,
            f"{text.strip()!r} is neither a palette preset ({', '.join(PALETTE_PRESETS)}) "
            "nor #rrggbb[:weight] members separated by |",
        )
    return ColorPalette(name=name)


def parse_color_palette(value: object, _defaults: RowDefaults) -> ColorPalette:
    """A preset name, or ``#rrggbb[:weight]`` members (``|``-separated, or a JSON list)."""
    items: list[object] = list(value) if isinstance(value, list) else list(_text(value).split("|"))
    if len(items) == 1 and not _text(items[0]).lstrip().startswith("#"):
        return _palette_preset(_text(items[0]))
    members = tuple(_palette_member(item, number) for number, item in enumerate(items, 1))
    return ColorPalette(members=members)


def parse_seed(value: object, _defaults: RowDefaults) -> int:
    return _integer(value, *SEED_RANGE)


def parse_num_results(value: object, _defaults: RowDefaults) -> int:
    return _integer(value, 1, MAX_RESULTS)


def parse_output_quality(value: object, _defaults: RowDefaults) -> int:
    return _integer(value, *QUALITY_RANGE)


def parse_background_value(value: object, defaults: RowDefaults) -> str:
    """``#rrggbb``, ``#top,#bottom`` or an image reference (a local file made absolute)."""
    text = _text(value).strip()
    try:
        background = parse_background(text)
    except ValueError as exc:
        raise InvalidField(Codes.INVALID_VALUE, str(exc)) from None
    if background.image is None:
        return text
    try:
        return parse_image_ref(background.image, defaults)
    except InvalidField as exc:
        hint = "a background is #rrggbb, #top,#bottom or an image reference"
        raise InvalidField(exc.code, f"{exc.reason} ({hint})") from None


_BOOLEANS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def parse_shadow(value: object, _defaults: RowDefaults) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).strip()
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise InvalidField(Codes.INVALID_VALUE, f"{text!r} is not true/false/yes/no/1/0") from None


# Every option column and its provider-independent parser (provider is checked apart).
OPTION_PARSERS: Mapping[str, Parser] = {
    "output": parse_output,
    "provider": parse_provider,
    "rendering_speed": parse_rendering_speed,
    "magic_prompt": parse_magic_prompt,
    "style_type": parse_style_type,
    "style_preset": parse_style_preset,
    "style_code": parse_style_code,
    "style_reference_images": parse_style_references,
    "color_palette": parse_color_palette,
    "seed": parse_seed,
    "num_results": parse_num_results,
    "output_format": parse_output_format,
    "output_quality": parse_output_quality,
    "background": parse_background_value,
    "shadow": parse_shadow,
}
_OPTIONS_BUT_PROVIDER = tuple((c, p) for c, p in OPTION_PARSERS.items() if c != "provider")


# -- prompt templates ---------------------------------------------------------------------

_FORMATTER = Formatter()
Template = tuple[tuple[str, str | None], ...]


@lru_cache(maxsize=32)
def compile_template(template: str) -> Template:
    """``(literal, field)`` pairs; ``{{``/``}}`` are literal braces. Raises InvalidField."""
    parts: list[tuple[str, str | None]] = []
    try:
        for literal, name, spec, conversion in _FORMATTER.parse(template):
            if name is not None and (spec or conversion):
                raise InvalidField(
                    Codes.BAD_TEMPLATE,
                    f"{{{name}...}}: format specs and conversions are not supported",
                )
            if name is not None and (not name.strip() or "{" in name):
                raise InvalidField(Codes.BAD_TEMPLATE, f"{{{name}}} does not name a column")
            parts.append((literal, None if name is None else name.strip()))
    except ValueError as exc:
        raise InvalidField(
            Codes.BAD_TEMPLATE, f"malformed template: {exc} (write {{{{ or }}}} for a brace)"
        ) from None
    return tuple(parts)


def render_template(template: str, lookup: Callable[[str], str | None]) -> str:
    """The template with every ``{column}`` replaced; ``lookup`` returns None if unknown."""
    if "{" not in template and "}" not in template:
        return template
    pieces: list[str] = []
    unknown: list[str] = []
    for literal, name in compile_template(template):
        pieces.append(literal)
        if name is None:
            continue
        value = lookup(name)
        if value is None:
            unknown.append(name)
        else:
            pieces.append(value)
    if unknown:
        names = ", ".join(f"{{{name}}}" for name in unknown)
        raise InvalidField(Codes.UNKNOWN_TEMPLATE_FIELD, f"unknown template field {names}")
    return "".join(pieces)


# -- the row ------------------------------------------------------------------------------


class _Row:
    """One row being validated: its values, the defaults and the errors so far."""

    __slots__ = ("defaults", "errors", "line", "values")

    def __init__(self, values: Mapping[str, object], line: int, defaults: RowDefaults) -> None:
        self.values = values
        self.line = line
        self.defaults = defaults
        self.errors: list[FieldError] = []

    def fail(self, column: str, code: str, reason: str) -> None:
        self.errors.append(FieldError(self.line, column, code, reason))

    def given(self, column: str) -> object | None:
        """The row's value, else the ``--set`` default of an option column, else None."""
        value = self.values.get(column)
        if value.__class__ is str:
            if value and not value.isspace():
                return value
        elif value is not None and value != []:
            return value
        value = self.defaults.values.get(column) if column in _OPTION_SET else None
        return None if is_blank(value) else value

    def check(self, column: str, parse: Callable[[object, RowDefaults], T]) -> T | None:
        value = self.given(column)
        if value is None:
            return None
        try:
            return parse(value, self.defaults)
        except InvalidField as exc:
            self.fail(column, exc.code, exc.reason)
            return None

    def require(self, column: str, parse: Callable[[object, RowDefaults], T]) -> T | None:
        value = self.values.get(column)
        if is_blank(value):
            self.fail(column, Codes.MISSING_FIELD, f"{column} is required")
            return None
        try:
            return parse(value, self.defaults)
        except InvalidField as exc:
            self.fail(column, exc.code, exc.reason)
            return None

    def template_value(self, name: str) -> str | None:
        if name in self.values or name in KNOWN_COLUMNS:
            value = self.given(name)
            return "" if value is None else as_text(value)
        return None


def _prompt(row: _Row) -> str | None:
    value = row.values.get("prompt")
    template = row.defaults.prompt if is_blank(value) else value
    if template is None or is_blank(template):
        row.fail("prompt", Codes.MISSING_FIELD, "prompt is required (in the row or --prompt)")
        return None
    try:
        prompt = render_template(_text(template), row.template_value).strip()
    except InvalidField as exc:
        row.fail("prompt", exc.code, exc.reason)
        return None
    if not prompt:
        row.fail("prompt", Codes.EMPTY_PROMPT, "the prompt is empty after templating")
        return None
    if len(prompt) > PROMPT_MAX_CHARS:
        row.fail(
            "prompt",
            Codes.PROMPT_TOO_LONG,
            f"the prompt is {len(prompt)} characters after templating (at most {PROMPT_MAX_CHARS})",
        )
        return None
    return prompt


def _provider(row: _Row) -> tuple[str | None, ProviderCaps | None]:
    """The row's provider (row, --set, --provider) and its caps; None when invalid."""
    value = row.given("provider")
    try:
        name = parse_provider(row.defaults.provider if value is None else value, row.defaults)
    except InvalidField as exc:
        row.fail("provider", exc.code, exc.reason)
        return None, None
    if name not in row.defaults.available_providers:
        available = ", ".join(sorted(row.defaults.available_providers)) or "none"
        row.fail(
            "provider",
            Codes.INPUT_PROVIDER_UNAVAILABLE,
            f"provider {name} is not available here (available: {available})",
        )
    elif name in row.defaults.missing_keys:
        variable = row.defaults.missing_keys[name]
        row.fail(
            "provider",
            Codes.INPUT_PROVIDER_UNAVAILABLE,
            f"provider {name} needs {variable}, which is not set here",
        )
    return name, PROVIDER_CAPS[name]


def _providers_with(capability: str) -> str:
    names = [n for n, c in PROVIDER_CAPS.items() if c.generative and getattr(c, capability)]
    return " and ".join(names) or "no provider"


def _check_caps(row: _Row, options: dict[str, Any], provider: str, caps: ProviderCaps) -> None:
    """What this provider refuses. A non-generative provider (``local``) ignores the options
    that steer a model (style type, palette, seed), so they pass unchecked there."""
    results = options.get("num_results")
    if results is not None and results > caps.max_results:
        row.fail(
            "num_results",
            Codes.OUT_OF_RANGE,
            f"{results} is out of range 1-{caps.max_results} for provider {provider}",
        )
    if not caps.generative:
        return
    style_type = options.get("style_type")
    if style_type is not None and style_type not in caps.style_types:
        accepted = ", ".join(t for t in STYLE_TYPES if t in caps.style_types)
        row.fail(
            "style_type",
            Codes.UNSUPPORTED_OPTION,
            f"style_type {style_type} is not accepted by provider {provider} (accepts {accepted})",
        )
    for column in ("color_palette", "seed"):
        if options.get(column) is not None and not getattr(caps, column):
            row.fail(
                column,
                Codes.UNSUPPORTED_OPTION,
                f"{column} is {_providers_with(column)} only (provider {provider})",
            )


def _check_conflicts(row: _Row, options: Mapping[str, Any]) -> None:
    if options.get("style_code") is None:
        return
    for other in ("style_type", "style_reference_images"):
        if options.get(other) is not None:
            row.fail(
                "style_code",
                Codes.CONFLICTING_OPTIONS,
                f"style_code cannot be combined with {other}",
            )


def _options(row: _Row, provider: str | None, caps: ProviderCaps | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    values, set_values = row.values, row.defaults.values
    for column, parse in _OPTIONS_BUT_PROVIDER:
        if column not in values and column not in set_values:
            continue
        parsed = row.check(column, parse)
        if parsed is not None:
            options[column] = parsed
    if provider is not None and caps is not None:
        _check_caps(row, options, provider, caps)
    _check_conflicts(row, options)
    return options


def _meta(values: Mapping[str, object]) -> dict[str, str]:
    return {k: as_text(v) for k, v in values.items() if k not in KNOWN_COLUMNS}


def _spec(data: dict[str, Any], line: int) -> JobSpec | list[FieldError]:
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:  # a gap between the checks above and JobSpec
        return [
            FieldError(line, str(e["loc"][0]) if e["loc"] else ROW, Codes.INVALID_VALUE, e["msg"])
            for e in exc.errors()
        ]


def validate_row(
    values: Mapping[str, object], *, line: int, defaults: RowDefaults
) -> JobSpec | list[FieldError]:
    """The row as a ``JobSpec``, or every problem found in it (never raises for bad data).

    ``values`` maps column names to what the manifest holds; columns that are not part of
    the manifest format go to ``meta`` as text. Duplicate ids are checked by the reader.
    Provider caps apply to the row's provider; a non-generative one (``local``) accepts the
    style, palette and seed options without provider checks, and ignores them.
    """
    row = _Row(values, line, defaults)
    row_id = row.require("id", parse_id)
    image = row.require("image", parse_image_ref)
    prompt = _prompt(row)
    provider, caps = _provider(row)
    options = _options(row, provider, caps)
    if row.errors:
        return row.errors
    data: dict[str, Any] = {
        "id": row_id,
        "image": image,
        "prompt": prompt,
        "provider": provider,
        "meta": _meta(values),
    }
    data.update(options)
    return _spec(data, line)
