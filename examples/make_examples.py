"""Draw synthetic product shots for the demo and the tests; no image files are committed.

    python examples/make_examples.py DIR [COUNT]

writes the files ``examples/manifest.csv`` refers to into DIR and prints their paths.
They cover the inputs the decoder has to cope with: JPEG and PNG, CMYK JPEG, palette
PNG, greyscale, 16-bit greyscale, RGBA with a transparent background and a JPEG whose
EXIF orientation tag says "rotate me". Everything is deterministic given the seed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

WHITE = (248, 248, 246)
LIGHT_GREY = (226, 226, 224)
LIGHT_BLUE = (212, 226, 240)
KINDS = ("bottle", "box", "mug", "sneaker", "ring")

_SUPERSAMPLE = 2
_NOISE_SIGMA = 1.8
_EXIF_ORIENTATION = 0x0112

Box = tuple[float, float, float, float]
Colour = tuple[int, int, int]
Drawer = Callable[[ImageDraw.ImageDraw, float, float, float, np.random.Generator], Box]


def _pick(rng: np.random.Generator, options: list[Colour]) -> Colour:
    return options[int(rng.integers(len(options)))]


def _bottle(
    draw: ImageDraw.ImageDraw, cx: float, base: float, unit: float, rng: np.random.Generator
) -> Box:
    glass = _pick(rng, [(150, 82, 28), (38, 104, 66), (40, 66, 140)])
    body_w, body_h, neck_w = 0.36 * unit, 0.66 * unit, 0.13 * unit
    top = base - body_h
    draw.rounded_rectangle(
        (cx - body_w / 2, top, cx + body_w / 2, base), radius=0.06 * unit, fill=glass
    )
    shoulder = top - 0.12 * unit
    draw.polygon(
        [
            (cx - body_w / 2, top + 0.05 * unit),
            (cx - neck_w / 2, shoulder),
            (cx + neck_w / 2, shoulder),
            (cx + body_w / 2, top + 0.05 * unit),
        ],
        fill=glass,
    )
    neck_top = shoulder - 0.12 * unit
    draw.rectangle((cx - neck_w / 2, neck_top, cx + neck_w / 2, shoulder + 2), fill=glass)
    cap = (cx - neck_w * 0.62, neck_top - 0.1 * unit, cx + neck_w * 0.62, neck_top + 0.01 * unit)
    draw.rounded_rectangle(cap, radius=0.015 * unit, fill=(44, 44, 48))
    label_top = top + 0.18 * unit
    label = (cx - body_w / 2, label_top, cx + body_w / 2, label_top + 0.28 * unit)
    draw.rectangle(label, fill=(236, 222, 190))
    for i, colour in enumerate([(170, 40, 40), (60, 60, 60), (60, 60, 60)]):
        y = label_top + (0.07 + 0.07 * i) * unit
        half = (0.12 if i == 0 else 0.09) * unit
        draw.rectangle((cx - half, y, cx + half, y + 0.025 * unit), fill=colour)
    # A glint: thin and small, so the matte must treat it as part of the bottle.
    glint_x = cx - body_w * 0.3
    draw.rectangle(
        (glint_x, top + 0.5 * unit, glint_x + 0.012 * unit, top + 0.62 * unit), fill=(246, 246, 244)
    )
    return (cx - body_w / 2, cap[1], cx + body_w / 2, base)


def _box(
    draw: ImageDraw.ImageDraw, cx: float, base: float, unit: float, rng: np.random.Generator
) -> Box:
    front = _pick(rng, [(186, 146, 98), (40, 128, 128), (200, 70, 60)])
    side = tuple(int(c * 0.72) for c in front)
    lid = tuple(min(255, int(c * 1.12)) for c in front)
    w, h, depth = 0.62 * unit, 0.55 * unit, 0.2 * unit
    left = cx - (w + depth) / 2
    top = base - h
    draw.rectangle((left, top, left + w, base), fill=front)
    draw.polygon(
        [
            (left + w, top),
            (left + w + depth, top - depth * 0.6),
            (left + w + depth, base - depth * 0.6),
            (left + w, base),
        ],
        fill=side,
    )
    draw.polygon(
        [
            (left, top),
            (left + depth, top - depth * 0.6),
            (left + w + depth, top - depth * 0.6),
            (left + w, top),
        ],
        fill=lid,
    )
    r = 0.09 * unit
    draw.ellipse(
        (left + w / 2 - r, top + h * 0.3 - r, left + w / 2 + r, top + h * 0.3 + r),
        fill=(250, 222, 150),
    )
    draw.rectangle((left + w * 0.2, top + h * 0.62, left + w * 0.8, top + h * 0.68), fill=side)
    return (left, top - depth * 0.6, left + w + depth, base)


def _mug(
    draw: ImageDraw.ImageDraw, cx: float, base: float, unit: float, rng: np.random.Generator
) -> Box:
    glaze = _pick(rng, [(178, 42, 42), (36, 52, 104), (204, 150, 40)])
    w, h = 0.58 * unit, 0.7 * unit
    left, top = cx - w / 2 - 0.1 * unit, base - h
    # The handle: a thick ring whose inside stays empty, a see-through hole.
    handle = (left + w - 0.1 * unit, top + 0.12 * unit, left + w + 0.26 * unit, top + 0.56 * unit)
    draw.ellipse(handle, outline=glaze, width=int(0.07 * unit))
    draw.rounded_rectangle((left, top, left + w, base), radius=0.05 * unit, fill=glaze)
    inner = tuple(int(c * 0.55) for c in glaze)
    draw.ellipse((left, top - 0.05 * unit, left + w, top + 0.05 * unit), fill=inner)
    return (left, top - 0.05 * unit, handle[2], base)


def _sneaker(
    draw: ImageDraw.ImageDraw, cx: float, base: float, unit: float, rng: np.random.Generator
) -> Box:
    upper = _pick(rng, [(34, 90, 170), (200, 60, 50), (70, 70, 76)])
    length, left = 1.05 * unit, cx - 0.525 * unit
    sole_h = 0.08 * unit

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + x * unit, base - y * unit)

    draw.rounded_rectangle(
        (*at(0.0, sole_h / unit), *at(1.05, 0.0)), radius=sole_h / 2, fill=(52, 52, 56)
    )
    draw.rectangle((*at(0.02, 0.15), *at(1.03, 0.07)), fill=(226, 214, 196))
    outline = [
        at(0.02, 0.14),
        at(0.0, 0.36),
        at(0.05, 0.42),
        at(0.26, 0.4),
        at(0.5, 0.3),
        at(0.8, 0.24),
        at(0.98, 0.2),
        at(1.04, 0.14),
    ]
    draw.polygon(outline, fill=upper)
    # A stripe and laces inside the upper: enclosed, so they stay part of the shoe.
    stripe = [at(0.12, 0.18), at(0.58, 0.25), at(0.8, 0.2), at(0.56, 0.2), at(0.14, 0.16)]
    draw.polygon(stripe, fill=(246, 196, 64))
    for i in range(5):
        x0, y0 = at(0.3 + 0.06 * i, 0.33 - 0.025 * i)
        x1, y1 = at(0.34 + 0.06 * i, 0.3 - 0.025 * i)
        draw.line((x0, y0, x1, y1), fill=(240, 240, 236), width=max(2, int(0.012 * unit)))
    return (left, base - 0.42 * unit, left + length, base)


def _ring(
    draw: ImageDraw.ImageDraw, cx: float, base: float, unit: float, rng: np.random.Generator
) -> Box:
    metal = _pick(rng, [(206, 164, 58), (170, 174, 182), (190, 110, 80)])
    outer = 0.42 * unit
    cy = base - outer
    draw.ellipse((cx - outer, cy - outer, cx + outer, cy + outer), fill=metal)
    darker = tuple(int(c * 0.7) for c in metal)
    draw.ellipse(
        (cx - outer * 0.86, cy - outer * 0.86, cx + outer * 0.86, cy + outer * 0.86), fill=darker
    )
    hole = outer * 0.62
    draw.ellipse((cx - hole, cy - hole, cx + hole, cy + hole), fill=(0, 0, 0, 0))
    return (cx - outer, cy - outer, cx + outer, base)


_DRAWERS: dict[str, Drawer] = {
    "bottle": _bottle,
    "box": _box,
    "mug": _mug,
    "sneaker": _sneaker,
    "ring": _ring,
}


def _studio_backdrop(size: tuple[int, int], backdrop: Colour) -> np.ndarray:
    """A sweep that is a touch darker at the top and a soft vignette to the corners."""
    width, height = size
    ys = np.linspace(-1.0, 1.0, height)[:, None]
    xs = np.linspace(-1.0, 1.0, width)[None, :]
    light = (1.0 - 0.035 * (1 - ys) / 2) * (1.0 - 0.06 * (xs * xs + ys * ys) / 2)
    return light[..., None] * np.asarray(backdrop, dtype=np.float64)


def _shade(layer: Image.Image, box: Box) -> Image.Image:
    """Cylindrical light across the product: darker flanks, a brighter middle."""
    pixels = np.asarray(layer, dtype=np.float64).copy()
    left, _, right, _ = box
    xs = np.arange(layer.width, dtype=np.float64)
    t = np.clip((xs - left) / max(right - left, 1.0), 0, 1)
    light = 0.74 + 0.26 * np.sin(np.pi * t) ** 0.7
    pixels[..., :3] *= light[None, :, None]
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGBA")


def product_layer(kind: str, size: tuple[int, int], seed: int) -> Image.Image:
    """The product alone on transparency, with slightly soft (antialiased) edges."""
    if kind not in _DRAWERS:
        raise ValueError(f"unknown product kind {kind!r} (one of {', '.join(KINDS)})")
    rng = np.random.default_rng(seed)
    width, height = size
    big = (width * _SUPERSAMPLE, height * _SUPERSAMPLE)
    layer = Image.new("RGBA", big, (0, 0, 0, 0))
    unit = min(big[0] * 0.85, big[1] * 0.72)
    cx = big[0] / 2 + float(rng.uniform(-0.04, 0.04)) * big[0]
    base = big[1] * float(rng.uniform(0.84, 0.88))
    box = _DRAWERS[kind](ImageDraw.Draw(layer), cx, base, unit, rng)
    layer = _shade(layer, box).reduce(_SUPERSAMPLE)
    # A lens is never perfectly sharp; blur premultiplied so edges do not darken.
    return layer.convert("RGBa").filter(ImageFilter.GaussianBlur(0.5)).convert("RGBA")


def product_shot(
    kind: str, size: tuple[int, int], backdrop: tuple[int, int, int], seed: int
) -> Image.Image:
    """An RGB studio shot: ``kind`` on a plain ``backdrop`` with vignette and sensor noise."""
    layer = np.asarray(product_layer(kind, size, seed), dtype=np.float64)
    alpha = layer[..., 3:] / 255
    shot = layer[..., :3] * alpha + _studio_backdrop(size, backdrop) * (1 - alpha)
    noise = np.random.default_rng(seed + 7919).normal(0.0, _NOISE_SIGMA, shot.shape)
    return Image.fromarray(np.clip(np.rint(shot + noise), 0, 255).astype(np.uint8), "RGB")


def scene(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A painted backdrop for the image-background example: sky, sun, horizon, floor."""
    width, height = size
    horizon = int(height * 0.64)
    t = np.linspace(0.0, 1.0, horizon)[:, None]
    sky = (1 - t) * np.array([92, 150, 222]) + t * np.array([236, 226, 210])
    floor_t = np.linspace(0.0, 1.0, height - horizon)[:, None]
    floor = (1 - floor_t) * np.array([196, 162, 120]) + floor_t * np.array([140, 104, 70])
    rows = np.vstack([sky, floor])
    canvas = np.repeat(rows[:, None, :], width, axis=1)
    img = Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")
    glow = Image.new("L", size, 0)
    sun_x, sun_y, r = width * 0.74, height * 0.24, min(size) * 0.07
    ImageDraw.Draw(glow).ellipse((sun_x - r, sun_y - r, sun_x + r, sun_y + r), fill=255)
    img.paste((255, 236, 190), mask=glow.filter(ImageFilter.GaussianBlur(r * 0.9)))
    img.paste((255, 248, 226), mask=glow)
    draw = ImageDraw.Draw(img)
    for i in range(1, 9):
        y = horizon + (height - horizon) * (i / 9) ** 1.6
        draw.line((0, y, width, y), fill=(128, 94, 62), width=max(1, height // 400))
    noise = np.random.default_rng(seed).normal(0.0, 1.2, (height, width, 3))
    pixels = np.asarray(img, dtype=np.float64) + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


# --- files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    filename: str
    kind: str
    size: tuple[int, int]
    backdrop: Colour
    variant: str


EXAMPLES: tuple[Example, ...] = (
    Example("bottle_white.jpg", "bottle", (1024, 1024), WHITE, "jpeg"),
    Example("box_grey.png", "box", (1024, 1024), LIGHT_GREY, "png"),
    Example("mug_blue.jpg", "mug", (1024, 1024), LIGHT_BLUE, "jpeg"),
    Example("sneaker_white.png", "sneaker", (1200, 900), WHITE, "png"),
    Example("ring_grey.jpg", "ring", (900, 900), LIGHT_GREY, "jpeg"),
    Example("bottle_cmyk.jpg", "bottle", (800, 1000), LIGHT_BLUE, "cmyk"),
    Example("box_palette.png", "box", (800, 800), WHITE, "palette"),
    Example("mug_greyscale.png", "mug", (900, 900), LIGHT_GREY, "greyscale"),
    Example("sneaker_16bit.png", "sneaker", (1000, 750), WHITE, "16bit"),
    Example("ring_transparent.png", "ring", (800, 800), WHITE, "rgba"),
    Example("bottle_rotated.jpg", "bottle", (768, 1024), WHITE, "exif"),
    Example("scene_sunlit.jpg", "scene", (1280, 960), WHITE, "jpeg"),
)


def _to_16bit_grey(img: Image.Image) -> Image.Image:
    rgb = np.asarray(img, dtype=np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    return Image.fromarray(np.rint(luma * 257).astype(np.uint16))


def _save(img: Image.Image, path: Path, variant: str) -> None:
    if variant == "cmyk":
        img.convert("CMYK").save(path, "JPEG", quality=92)
    elif variant == "palette":
        img.quantize(colors=96, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, "PNG"
        )
    elif variant == "greyscale":
        img.convert("L").save(path, "PNG")
    elif variant == "16bit":
        _to_16bit_grey(img).save(path, "PNG")
    elif variant == "exif":
        exif = Image.Exif()
        # Orientation 6: the viewer turns the stored picture 90° clockwise to show it.
        exif[_EXIF_ORIENTATION] = 6
        img.transpose(Image.Transpose.ROTATE_90).save(path, "JPEG", quality=92, exif=exif)
    elif path.suffix == ".jpg":
        img.save(path, "JPEG", quality=92)
    else:
        img.save(path, "PNG")


def _render(example: Example, seed: int, scale: float) -> Image.Image:
    size = (max(16, round(example.size[0] * scale)), max(16, round(example.size[1] * scale)))
    if example.kind == "scene":
        return scene(size, seed)
    if example.variant == "rgba":
        return product_layer(example.kind, size, seed)
    return product_shot(example.kind, size, example.backdrop, seed)


def _extra(index: int) -> Example:
    kind = KINDS[index % len(KINDS)]
    backdrop = (WHITE, LIGHT_GREY, LIGHT_BLUE)[index % 3]
    return Example(f"extra_{index:03d}_{kind}.jpg", kind, (1024, 1024), backdrop, "jpeg")


def write_examples(
    directory: Path, count: int = len(EXAMPLES), *, scale: float = 1.0
) -> list[Path]:
    """Write ``count`` example files (the manifest's dozen first, then extra shots).

    ``scale`` shrinks every picture (the tests use small ones); names stay the same.
    """
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        example = EXAMPLES[index] if index < len(EXAMPLES) else _extra(index)
        path = directory / example.filename
        _save(_render(example, 1000 + index, scale), path, example.variant)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(f"usage: {Path(argv[0]).name} DIR [COUNT]", file=sys.stderr)
        return 2
    count = int(argv[2]) if len(argv) == 3 else len(EXAMPLES)
    for path in write_examples(Path(argv[1]), count):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
