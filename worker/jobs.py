"""What a job is: the validated, provider-neutral form of one manifest row.

The enums and ranges come from the two seed pages (Runware ``ideogram:4@5`` and
fal ``fal-ai/ideogram/v3/replace-background``); per-provider differences are each
provider's ``ProviderCaps`` (its ``SPEC``, worker/providers/) so that validation refuses,
before anything is paid, what the chosen provider would refuse.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

RenderingSpeed = Literal["TURBO", "BALANCED", "QUALITY"]
MagicPrompt = Literal["AUTO", "ON", "OFF"]
StyleType = Literal["AUTO", "GENERAL", "REALISTIC", "DESIGN", "RENDER_3D", "ANIME", "FICTION"]
OutputFormat = Literal["JPG", "PNG", "WEBP"]

STYLE_TYPES: tuple[str, ...] = (
    "AUTO", "GENERAL", "REALISTIC", "DESIGN", "RENDER_3D", "ANIME", "FICTION",
)  # fmt: skip
STYLE_PRESETS: tuple[str, ...] = (
    "80S_ILLUSTRATION", "90S_NOSTALGIA", "ABSTRACT_ORGANIC", "ANALOG_NOSTALGIA", "ART_BRUT",
    "ART_DECO", "ART_POSTER", "AURA", "AVANT_GARDE", "BAUHAUS", "BLUEPRINT", "BLURRY_MOTION",
    "BRIGHT_ART", "C4D_CARTOON", "CHILDRENS_BOOK", "COLLAGE", "COLORING_BOOK_I",
    "COLORING_BOOK_II", "CUBISM", "DARK_AURA", "DOODLE", "DOUBLE_EXPOSURE", "DRAMATIC_CINEMA",
    "EDITORIAL", "EMOTIONAL_MINIMAL", "ETHEREAL_PARTY", "EXPIRED_FILM", "FLAT_ART",
    "FLAT_VECTOR", "FOREST_REVERIE", "GEO_MINIMALIST", "GLASS_PRISM", "GOLDEN_HOUR",
    "GRAFFITI_I", "GRAFFITI_II", "HALFTONE_PRINT", "HIGH_CONTRAST", "HIPPIE_ERA", "ICONIC",
    "JAPANDI_FUSION", "JAZZY", "LONG_EXPOSURE", "MAGAZINE_EDITORIAL", "MINIMAL_ILLUSTRATION",
    "MIXED_MEDIA", "MONOCHROME", "NIGHTLIFE", "OIL_PAINTING", "OLD_CARTOONS", "PAINT_GESTURE",
    "POP_ART", "RETRO_ETCHING", "RIVIERA_POP", "SPOTLIGHT_80S", "STYLIZED_RED",
    "SURREAL_COLLAGE", "TRAVEL_POSTER", "VINTAGE_GEO", "VINTAGE_POSTER", "WATERCOLOR", "WEIRD",
    "WOODBLOCK_PRINT",
)  # fmt: skip
PALETTE_PRESETS: tuple[str, ...] = (
    "EMBER", "FRESH", "JUNGLE", "MAGIC", "MELON", "MOSAIC", "PASTEL", "ULTRAMARINE",
)  # fmt: skip

PROMPT_MAX_CHARS = 2000
ID_MAX_CHARS = 256
QUALITY_RANGE = (20, 99)
SEED_RANGE = (0, 2**31 - 1)
MAX_STYLE_REFERENCES = 4


@dataclass(frozen=True)
class ProviderCaps:
    """What a provider accepts beyond the shared columns."""

    max_results: int
    style_types: frozenset[str]
    color_palette: bool
    seed: bool
    # The local provider ignores the options that steer a generative model.
    generative: bool = True


class PaletteMember(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rgb: tuple[int, int, int]
    weight: float | None = None


class ColorPalette(BaseModel):
    """Either a preset ``name`` or explicit ``members`` (exactly one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | None = None
    members: tuple[PaletteMember, ...] | None = None


class JobSpec(BaseModel):
    """One validated manifest row. Image references are kept as given (after staging)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=ID_MAX_CHARS)
    image: str
    prompt: str = Field(min_length=1, max_length=PROMPT_MAX_CHARS)
    output: str | None = None
    provider: str = "local"  # a name in worker/providers' registry (validation checks)
    rendering_speed: RenderingSpeed | None = None
    magic_prompt: MagicPrompt | None = None
    style_type: StyleType | None = None
    style_preset: str | None = None
    style_code: str | None = None
    style_reference_images: tuple[str, ...] | None = None
    color_palette: ColorPalette | None = None
    seed: int | None = None
    num_results: int = Field(default=1, ge=1, le=20)
    output_format: OutputFormat | None = None
    output_quality: int | None = Field(default=None, ge=QUALITY_RANGE[0], le=QUALITY_RANGE[1])
    background: str | None = None
    shadow: bool | None = None
    meta: dict[str, str] = Field(default_factory=dict)


class Job(BaseModel):
    """What a worker processes: a row plus where it sits in its batch and where results go."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_id: str
    index: int
    line: int
    spec: JobSpec
    # Destination base without extension: ``s3://b/k``, a presigned URL, or a local path.
    dest: str
    # The row's fingerprint when the producer found it (worker/fingerprint.py): the
    # producer looked it up already, and the worker indexes the row under it.
    fingerprint: str | None = None

    @property
    def job_id(self) -> str:
        return job_id(self.batch_id, self.spec.id)


_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def safe_id(row_id: str) -> str:
    """A filesystem- and S3-safe key for a row id, injective in practice.

    Plain ids are kept as they are (SKUs usually are); anything else is slugged and
    suffixed with a short digest of the original so that ``a/b`` and ``a_b`` differ.
    """
    if _SAFE_ID.match(row_id) and not row_id.endswith("."):
        return row_id
    slug = _UNSAFE_CHARS.sub("_", row_id).strip("._-")[:100] or "row"
    digest = hashlib.sha256(row_id.encode()).hexdigest()[:10]
    return f"{slug}-{digest}"


def job_id(batch_id: str, row_id: str) -> str:
    """Deterministic: the same row of the same batch always has the same job id."""
    return f"{batch_id}:{safe_id(row_id)}"


# Celery task names: the producer publishes by name, without importing the worker's app.
TASK_PROCESS_ROW = "bgswap.process_row"
TASK_PROCESS_ROWS = "bgswap.process_rows"  # a chunk of one batch's rows (producer/publish.py)
TASK_FINALIZE_BATCH = "bgswap.finalize_batch"
TASK_DELIVER_CALLBACK = "bgswap.deliver_callback"


def finalize_task_id(batch_id: str) -> str:
    return f"{batch_id}:finalize"


EXTENSIONS: dict[str, str] = {"JPG": "jpg", "PNG": "png", "WEBP": "webp"}
CONTENT_TYPES: dict[str, str] = {"JPG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


RGB = tuple[int, int, int]
_HEX_COLOUR = re.compile(r"^#([0-9A-Fa-f]{6})$")


def parse_hex_colour(text: str) -> RGB:
    match = _HEX_COLOUR.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a colour of the form #rrggbb")
    value = match.group(1)
    return (int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16))


@dataclass(frozen=True)
class Background:
    """The local provider's backdrop: a solid colour, a vertical gradient or an image."""

    colours: tuple[RGB, ...] = ()
    image: str | None = None


DEFAULT_BACKGROUND = Background(colours=((0xF4, 0xF1, 0xEA), (0xD9, 0xD2, 0xC5)))


def parse_background(text: str) -> Background:
    """``#rrggbb`` | ``#top,#bottom`` | an image reference (URL, s3://, data:, path)."""
    value = text.strip()
    if value.startswith("#"):
        parts = value.split(",")
        if len(parts) > 2:
            raise ValueError("a gradient has exactly two colours: #top,#bottom")
        return Background(colours=tuple(parse_hex_colour(p) for p in parts))
    if not value:
        raise ValueError("empty background")
    return Background(image=value)
