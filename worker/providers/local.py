"""The offline ``local`` provider: cut a product out of its studio backdrop, put it on a new one.

No model and no network: it works for what catalogue shots usually are, one product on
a plain, evenly coloured backdrop. Every step is a plain function of its inputs
(numpy + Pillow, no randomness), so the same image and options give identical bytes.

1. ``estimate_backdrop`` fits a smooth quadratic surface per channel to a strip along
   the image border, refitting on inliers: studio backdrops are plain but unevenly lit
   (vignette, sweep gradient), and a product may touch the border. The spread of the
   border residuals sets the noise tolerance.
2. ``colour_distance``: L1 distance of every pixel to that surface, averaged over 3x3
   so that sensor noise cancels out and faint products still stand out.
3. ``clean_mask``: the core (distance past the middle of the ramp) is split into
   connected components. Components smaller than ``SPECK_FRACTION`` of the image are
   dust or noise and are dropped. Enclosed backdrop-coloured regions (not connected to
   the border) smaller than ``HOLE_FRACTION`` of the image are filled: highlights and
   white print on the product. Larger enclosed regions stay see-through, so the hole of
   a ring or the gap inside a mug handle shows the new background. (A large white label
   exactly the colour of a white backdrop is therefore cut out too: a known limit.)
4. ``refine_edges``: along the outline, alpha is the projection of the pixel onto the
   line from the backdrop colour to the nearby product colour, blended with a
   smoothstep ramp of the distance where that contrast is too low to trust; then a
   small Gaussian feather scaled with the image. Edge colours are decontaminated
   (F = B + (I - B) / alpha), so no rim of the old backdrop survives.
5. ``contact_shadow`` under the bottom of the product, ``render_background``, and the
   composite in ``replace_background``.

An input with real transparency skips 1-4: its alpha channel is the matte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageOps

from worker.errors import Codes, FieldError, ImageRejected, InvalidInput
from worker.imaging import OutputFormatName, decode_image, encode_image
from worker.jobs import (
    CONTENT_TYPES,
    DEFAULT_BACKGROUND,
    EXTENSIONS,
    RGB,
    STYLE_TYPES,
    Background,
    Job,
    JobSpec,
    ProviderCaps,
    parse_background,
)
from worker.providers.base import OutputImage, ProviderContext, ProviderResult, ProviderSpec

U8 = NDArray[np.uint8]
Float = NDArray[np.float32]
Mask = NDArray[np.bool_]
Ints = NDArray[np.int64]

DEFAULT_SHADOW = True
DEFAULT_OUTPUT_FORMAT: OutputFormatName = "JPG"
DEFAULT_QUALITY = 95

# Border strip sampled for the backdrop, as a fraction of the shorter side.
BORDER_FRACTION = 0.015
# Components of the product mask below this share of the image (or this many pixels:
# smoothing grows a 3x3 speck to 5x5) are dust or noise.
SPECK_FRACTION = 2.5e-4
MIN_SPECK_AREA = 40.0
# Enclosed backdrop-coloured regions below this share of the image belong to the product.
HOLE_FRACTION = 2e-3
MIN_HOLE_AREA = 64.0
SHADOW_STRENGTH = 0.42
_PLATE_GRID = 64
_RIDGE = 1e-3
# Below this a smooth JPEG backdrop (noise quantised away) would count block
# artifacts next to the product as product.
_TOLERANCE_FLOOR = 6.0
_TRANSPARENT_SHARE = 1e-3


@dataclass(frozen=True)
class Backdrop:
    """The studio backdrop as seen on the border: a smooth colour surface plus its noise."""

    colour: tuple[float, float, float]
    """Median border colour."""
    tolerance: float
    """L1 distance (0..765) up to which a pixel is surely backdrop."""
    ramp: float
    """Width of the soft ramp from backdrop (alpha 0) to product (alpha 1)."""
    coefficients: NDArray[np.float64]
    """(6, 3): per channel, c0 + c1 u + c2 v + c3 u² + c4 v² + c5 uv, u, v in [-1, 1]."""

    @property
    def core_threshold(self) -> float:
        return self.tolerance + self.ramp / 2

    def plate(self, width: int, height: int) -> U8:
        """The fitted backdrop at full size, HxWx3.

        Evaluated on a coarse grid and enlarged bilinearly: it is smooth, and this is
        ~30 times cheaper than evaluating the polynomial per pixel.
        """
        grid_w, grid_h = min(width, _PLATE_GRID), min(height, _PLATE_GRID)
        xs = (np.arange(grid_w) + 0.5) * width / grid_w - 0.5
        ys = (np.arange(grid_h) + 0.5) * height / grid_h - 0.5
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        basis = _basis(_normalised(xx.ravel(), width), _normalised(yy.ravel(), height))
        coarse = np.clip(np.rint(basis @ self.coefficients), 0, 255).astype(np.uint8)
        small = Image.fromarray(coarse.reshape(grid_h, grid_w, 3))
        return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))


@dataclass(frozen=True)
class Cutout:
    """The product layer: straight (not premultiplied) colours and their alpha."""

    alpha: U8
    colour: U8


@dataclass(frozen=True)
class _Runs:
    """Horizontal runs of a mask, sorted by (row, start); ``stop`` is exclusive."""

    row: Ints
    start: Ints
    stop: Ints

    def select(self, keep: Mask) -> _Runs:
        return _Runs(self.row[keep], self.start[keep], self.stop[keep])


@dataclass(frozen=True)
class _Components:
    """Per run: the area of its connected component and whether it touches the border."""

    area: NDArray[np.float64]
    on_border: Mask


# --- the backdrop -------------------------------------------------------------------


def _normalised(coord: NDArray[Any], extent: int) -> NDArray[np.float64]:
    half = max((extent - 1) / 2, 1.0)
    return (np.asarray(coord, dtype=np.float64) - (extent - 1) / 2) / half


def _basis(u: NDArray[np.float64], v: NDArray[np.float64]) -> NDArray[np.float64]:
    return np.stack([np.ones_like(u), u, v, u * u, v * v, u * v], axis=1)


def _border_regions(height: int, width: int) -> list[tuple[slice, slice]]:
    """Four strips along the border (top, bottom, left, right), not overlapping."""
    strip = max(2, round(min(height, width) * BORDER_FRACTION))
    strip = min(strip, max(1, min(height, width) // 4))
    regions = [
        (slice(0, strip), slice(0, width)),
        (slice(height - strip, height), slice(0, width)),
        (slice(strip, height - strip), slice(0, strip)),
        (slice(strip, height - strip), slice(width - strip, width)),
    ]
    return [(ys, xs) for ys, xs in regions if ys.stop > ys.start and xs.stop > xs.start]


def _region_basis(region: tuple[slice, slice], height: int, width: int) -> NDArray[np.float64]:
    ys, xs = np.mgrid[region]
    return _basis(_normalised(xs.ravel(), width), _normalised(ys.ravel(), height))


def _fit_surface(basis: NDArray[np.float64], colours: NDArray[np.float64]) -> NDArray[np.float64]:
    # A little ridge keeps the curvature sane when inliers sit on one side only.
    damping = _RIDGE * len(basis) * np.diag([0.0, 1, 1, 1, 1, 1])
    solved = np.linalg.solve(basis.T @ basis + damping, basis.T @ colours)
    return np.asarray(solved, dtype=np.float64)


def _robust_surface(
    basis: NDArray[np.float64], colours: NDArray[np.float64]
) -> tuple[NDArray[np.float64], float]:
    """Coefficients fitted to the backdrop part of the border, and the inlier cutoff."""
    residual = np.abs(colours - np.median(colours, axis=0)).sum(axis=1)
    # Start from what is close to the typical border colour: a product, or a table,
    # taking up to half of the border is far from it and left out.
    cutoff = max(3.0 * float(np.median(residual)), 8.0)
    inliers = residual <= cutoff
    coefficients = _fit_surface(basis[inliers], colours[inliers])
    for _ in range(2):
        residual = np.abs(colours - basis @ coefficients).sum(axis=1)
        cutoff = max(3.0 * float(np.median(residual[inliers])), 6.0)
        inliers = residual <= cutoff
        coefficients = _fit_surface(basis[inliers], colours[inliers])
    return coefficients, cutoff


def _smoothed(distance: U8) -> U8:
    """3x3 mean: sensor noise averages out, a product keeps its distance."""
    return np.asarray(Image.fromarray(distance).filter(ImageFilter.BoxBlur(1)))


def _border_residuals(
    rgb: U8,
    regions: list[tuple[slice, slice]],
    bases: list[NDArray[np.float64]],
    coefficients: NDArray[np.float64],
) -> U8:
    """Smoothed distances to the surface on the border, exactly as the whole image gets."""
    parts = []
    for region, basis in zip(regions, bases, strict=True):
        block = rgb[region].astype(np.float64)
        surface = np.clip(np.rint(basis @ coefficients), 0, 255).reshape(block.shape)
        distance = np.minimum(np.abs(block - surface).sum(axis=2), 255).astype(np.uint8)
        parts.append(_smoothed(distance).ravel())
    return np.concatenate(parts)


def estimate_backdrop(rgb: U8) -> Backdrop:
    """Fit the backdrop to the image border; robust to a product touching the border."""
    height, width = rgb.shape[:2]
    regions = _border_regions(height, width)
    bases = [_region_basis(region, height, width) for region in regions]
    colours = np.concatenate([rgb[region].reshape(-1, 3) for region in regions])
    basis = np.concatenate(bases)
    # Every few pixels are plenty to fit six coefficients per channel.
    step = max(1, len(basis) // 20000)
    coefficients, cutoff = _robust_surface(basis[::step], colours[::step].astype(np.float64))
    residual = _border_residuals(rgb, regions, bases, coefficients).astype(np.float64)
    backdrop_like = residual[residual <= cutoff]
    residual = backdrop_like if len(backdrop_like) else residual
    typical = float(np.median(residual))
    spread = 1.4826 * float(np.median(np.abs(residual - typical)))
    # Six robust sigmas of the smoothed noise: of a million backdrop pixels, a handful
    # cross it, and those are specks that ``clean_mask`` removes.
    tolerance = typical + 6.0 * spread + _TOLERANCE_FLOOR
    median = np.median(colours, axis=0)
    return Backdrop(
        colour=(float(median[0]), float(median[1]), float(median[2])),
        tolerance=tolerance,
        ramp=max(10.0, tolerance),
        coefficients=coefficients,
    )


def colour_distance(rgb: U8, plate: U8) -> U8:
    """Per-pixel L1 distance |R-R'|+|G-G'|+|B-B'|, saturated at 255."""
    difference = ImageChops.difference(Image.fromarray(rgb), Image.fromarray(plate))
    return np.asarray(difference.convert("L", matrix=(1.0, 1.0, 1.0, 0.0)))


def ramp_table(backdrop: Backdrop) -> Float:
    """Smoothstep from ``tolerance`` to ``tolerance + ramp``, for every distance 0..255."""
    t = np.clip((np.arange(256, dtype=np.float32) - backdrop.tolerance) / backdrop.ramp, 0, 1)
    table: Float = (t * t * (3 - 2 * t)).astype(np.float32)
    return table


# --- connected components on run-length encoded masks --------------------------------


def _row_runs(mask: Mask) -> _Runs:
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    steps = np.diff(padded, axis=1)
    where = np.flatnonzero(steps)
    signs = steps.reshape(-1)[where]
    row, col = np.divmod(where, width + 1)
    starts, stops = signs == 1, signs == -1
    return _Runs(row[starts].astype(np.int64), col[starts].astype(np.int64), col[stops])


def _gaps(runs: _Runs, height: int, width: int) -> _Runs:
    """The complement of ``runs``, row by row, as runs of its own."""
    row, start, stop = runs.row, runs.start, runs.stop
    if len(row) == 0:
        rows = np.arange(height, dtype=np.int64)
        return _Runs(rows, np.zeros(height, dtype=np.int64), np.full(height, width, np.int64))
    same_row = np.r_[False, row[1:] == row[:-1]]
    before = np.where(same_row, np.r_[0, stop[:-1]], 0)
    last = np.r_[row[1:] != row[:-1], True]
    empty_rows = np.setdiff1d(np.arange(height), row)
    g_row = np.r_[row, row[last], empty_rows]
    g_start = np.r_[before, stop[last], np.zeros(len(empty_rows), dtype=np.int64)]
    g_stop = np.r_[start, np.full(int(last.sum()), width), np.full(len(empty_rows), width)]
    keep = g_stop > g_start
    order = np.lexsort((g_start[keep], g_row[keep]))
    return _Runs(g_row[keep][order], g_start[keep][order], g_stop[keep][order].astype(np.int64))


def _touching_pairs(runs: _Runs, width: int, diagonal: bool) -> tuple[Ints, Ints]:
    """Pairs (i, j): run j, one row below run i, touches it."""
    slack = 1 if diagonal else 0
    stride = width + 2
    below = (runs.row + 1) * stride
    first = np.searchsorted(runs.row * stride + runs.stop, below + runs.start - slack, "right")
    end = np.searchsorted(runs.row * stride + runs.start, below + runs.stop + slack, "left")
    counts = np.maximum(end - first, 0)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    upper = np.repeat(np.arange(len(counts)), counts)
    return upper, np.repeat(first, counts) + offsets


def _union(count: int, a: Ints, b: Ints) -> Ints:
    """Root label per node; vectorised union-find with pointer jumping."""
    parent = np.arange(count)
    while True:
        pa, pb = parent[a], parent[b]
        differ = pa != pb
        if not differ.any():
            return parent
        np.minimum.at(parent, np.maximum(pa, pb)[differ], np.minimum(pa, pb)[differ])
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def _components(runs: _Runs, height: int, width: int, *, diagonal: bool) -> _Components:
    upper, lower = _touching_pairs(runs, width, diagonal)
    root = _union(len(runs.row), upper, lower)
    area = np.bincount(root, weights=runs.stop - runs.start, minlength=len(root))
    border_run = (runs.row == 0) | (runs.row == height - 1) | (runs.start == 0)
    border_run |= runs.stop == width
    on_border = np.zeros(len(root), dtype=np.bool_)
    on_border[root[border_run]] = True
    return _Components(area=area[root].astype(np.float64), on_border=on_border[root])


def _paint(mask: Mask, runs: _Runs, value: bool) -> None:
    lengths = runs.stop - runs.start
    total = int(lengths.sum())
    if total == 0:
        return
    flat_start = runs.row * mask.shape[1] + runs.start
    index = np.repeat(flat_start - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
    mask.reshape(-1)[index] = value


def clean_mask(core: Mask) -> Mask:
    """Drop specks from a product mask and fill its small enclosed holes (see module doc)."""
    height, width = core.shape
    pixels = height * width
    runs = _row_runs(core)
    parts = _components(runs, height, width, diagonal=True)
    specks = parts.area < max(MIN_SPECK_AREA, SPECK_FRACTION * pixels)
    gaps = _gaps(runs.select(~specks), height, width)
    gap_parts = _components(gaps, height, width, diagonal=False)
    small = ~gap_parts.on_border & (gap_parts.area < max(MIN_HOLE_AREA, HOLE_FRACTION * pixels))
    cleaned = core.copy()
    _paint(cleaned, runs.select(specks), False)
    _paint(cleaned, gaps.select(small), True)
    return cleaned


# --- the soft edge --------------------------------------------------------------------


def _band_radius(height: int, width: int) -> int:
    # Wide enough for a lens-soft, JPEG-smeared edge (the smoothed core boundary sits
    # about a pixel outside the true edge); box-blur thresholds stay exact up to 10,
    # and the band goes twice the radius inward.
    return int(np.clip(round(min(height, width) / 400), 3, 5))


def _feather_sigma(height: int, width: int) -> float:
    return max(0.6, min(height, width) / 1600)


def _inner_colour(
    rgb: U8, field: U8, ys: Ints, xs: Ints, reach: int
) -> tuple[NDArray[np.float32], Mask]:
    """The product colour next to each outline pixel, sampled inward along the normal.

    ``field`` is the box-blurred product mask: 255 deep inside, its gradient points in.
    Samples go up to ``reach`` pixels in, enough to cross the whole band; the first two
    deep inside are averaged.
    """
    height, width = field.shape
    f = field.astype(np.int16)
    gx = f[ys, np.minimum(xs + 1, width - 1)] - f[ys, np.maximum(xs - 1, 0)]
    gy = f[np.minimum(ys + 1, height - 1), xs] - f[np.maximum(ys - 1, 0), xs]
    norm = np.maximum(np.hypot(gx, gy), 1).astype(np.float32)
    steps = np.arange(1, reach + 1, dtype=np.float32)
    sy = np.clip(np.rint(ys[:, None] + (gy / norm)[:, None] * steps), 0, height - 1)
    sx = np.clip(np.rint(xs[:, None] + (gx / norm)[:, None] * steps), 0, width - 1)
    flat = sy.astype(np.int64) * width + sx.astype(np.int64)
    inside = field.reshape(-1)[flat] == 255
    rows = np.arange(len(ys))
    first = np.argmax(inside, axis=1)
    second = np.minimum(first + 1, reach - 1)
    valid = inside[rows, first] & ((gx != 0) | (gy != 0))
    pixels = rgb.reshape(-1, 3)
    colour = pixels[flat[rows, first]].astype(np.float32)
    both = inside[rows, second] & (second > first)
    colour[both] = (colour[both] + pixels[flat[rows, second][both]]) / 2
    return colour, valid


def _edge_alpha(
    pixel: Float, back: Float, front: Float, valid: Mask, ramp: Float, *, trust_from: float
) -> Float:
    """Alpha of outline pixels: projection onto backdrop->product, ramp where unsure."""
    span = front - back
    contrast = np.abs(span).sum(axis=1)
    projected = ((pixel - back) * span).sum(axis=1) / np.maximum((span * span).sum(axis=1), 1)
    trust = np.clip((contrast - trust_from) / trust_from, 0, 1) * valid
    alpha = trust * np.clip(projected, 0, 1) + (1 - trust) * ramp
    # Sensor noise makes the projection wobble by a few percent around 0 and 1.
    result: Float = np.clip((alpha - 0.04) / 0.92, 0, 1).astype(np.float32)
    return result


def _decontaminate(
    pixel: Float, back: Float, front: Float, valid: Mask, alpha: Float
) -> NDArray[np.uint8]:
    """Foreground colour of outline pixels with the old backdrop's share removed."""
    solved = np.clip(back + (pixel - back) / np.maximum(alpha, 0.05)[:, None], 0, 255)
    # Dividing by a small alpha amplifies noise; there the nearby product colour is safer.
    fallback = np.where(valid[:, None], front, pixel)
    t = np.clip((alpha - 0.25) / 0.35, 0, 1)[:, None]
    result: U8 = np.rint(t * solved + (1 - t) * fallback).astype(np.uint8)
    return result


def _feather(alpha: U8, ys: Ints, xs: Ints, sigma: float, radius: int) -> U8:
    height, width = alpha.shape
    reach = min(radius, math.ceil(2 * sigma))
    total = np.zeros(len(ys), dtype=np.float32)
    weights = 0.0
    for dy in range(-reach, reach + 1):
        yy = np.clip(ys + dy, 0, height - 1)
        for dx in range(-reach, reach + 1):
            weight = math.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma))
            total += weight * alpha[yy, np.clip(xs + dx, 0, width - 1)]
            weights += weight
    result: U8 = np.rint(total / weights).astype(np.uint8)
    return result


def _product_box(keep: Mask, margin: int) -> tuple[slice, slice] | None:
    rows = np.flatnonzero(keep.any(axis=1))
    if len(rows) == 0:
        return None
    cols = np.flatnonzero(keep.any(axis=0))
    height, width = keep.shape
    return (
        slice(max(0, int(rows[0]) - margin), min(height, int(rows[-1]) + margin + 1)),
        slice(max(0, int(cols[0]) - margin), min(width, int(cols[-1]) + margin + 1)),
    )


def _edge_band(keep: Mask, radius: int) -> tuple[Ints, U8]:
    """Flat indices of the outline band, and the mask blurred to twice ``radius``."""
    mask = Image.fromarray(keep.view(np.uint8) * 255)
    # The band reaches twice as far in as out: the core boundary lies on the faint
    # outer tail of the edge, and where two edges meet the mixed pixels run deeper.
    outer = np.asarray(mask.filter(ImageFilter.BoxBlur(radius)))
    inner = np.asarray(mask.filter(ImageFilter.BoxBlur(2 * radius)))
    return np.flatnonzero((outer > 0) & (inner < 255)), inner


def refine_edges(rgb: U8, plate: U8, distance: U8, keep: Mask, backdrop: Backdrop) -> Cutout:
    """Soft alpha and clean colours along the outline of ``keep``; hard 0/1 elsewhere."""
    height, width = keep.shape
    radius = _band_radius(height, width)
    alpha = keep.view(np.uint8) * np.uint8(255)
    colour = rgb.copy()
    box = _product_box(keep, 3 * radius + 4)
    if box is None:
        return Cutout(alpha=alpha, colour=colour)
    # Only the product's surroundings matter; cropping halves the work for most shots.
    rgb_, plate_, keep_ = rgb[box], plate[box], keep[box]
    alpha_, colour_ = alpha[box], colour[box]
    index, inner = _edge_band(np.ascontiguousarray(keep_), radius)
    ys, xs = np.divmod(index, keep_.shape[1])
    pixel = rgb_[ys, xs].astype(np.float32)
    back = plate_[ys, xs].astype(np.float32)
    front, valid = _inner_colour(np.ascontiguousarray(rgb_), inner, ys, xs, 3 * radius + 3)
    ramp = ramp_table(backdrop)[distance[box][ys, xs]]
    trust_from = 2 * (backdrop.tolerance + backdrop.ramp)
    edge = _edge_alpha(pixel, back, front, valid, ramp, trust_from=trust_from)
    alpha_[ys, xs] = np.rint(edge * 255).astype(np.uint8)
    alpha_[ys, xs] = _feather(alpha_, ys, xs, _feather_sigma(height, width), radius)
    colour_[ys, xs] = _decontaminate(pixel, back, front, valid, edge)
    return Cutout(alpha=alpha, colour=colour)


def _has_transparency(alpha: U8) -> bool:
    return int(np.count_nonzero(alpha < 128)) >= max(1, _TRANSPARENT_SHARE * alpha.size)


def cut_out(rgb: U8, alpha: U8 | None = None) -> Cutout:
    """The product layer of an HxWx3 image (optionally with its own HxW alpha)."""
    if alpha is not None and _has_transparency(alpha):
        return Cutout(alpha=alpha, colour=rgb)
    height, width = rgb.shape[:2]
    backdrop = estimate_backdrop(rgb)
    plate = backdrop.plate(width, height)
    distance = _smoothed(colour_distance(rgb, plate))
    keep = clean_mask(distance >= backdrop.core_threshold)
    return refine_edges(rgb, plate, distance, keep, backdrop)


def product_matte(rgb: U8, alpha: U8 | None = None) -> Float:
    """The soft product matte in [0, 1], HxW float32."""
    matte: Float = cut_out(rgb, alpha).alpha.astype(np.float32) / np.float32(255)
    return matte


# --- the new background -------------------------------------------------------------


def render_background(
    size: tuple[int, int], background: Background, image: Image.Image | None = None
) -> Image.Image:
    """Solid colour, top-to-bottom gradient, or ``image`` scaled to cover and centred."""
    if background.image is not None:
        if image is None:
            raise ValueError("a background image reference needs the decoded image")
        return _cover(image, size)
    colours = background.colours or DEFAULT_BACKGROUND.colours
    if len(colours) == 1:
        return Image.new("RGB", size, colours[0])
    return _vertical_gradient(size, colours[0], colours[-1])


def _vertical_gradient(size: tuple[int, int], top: RGB, bottom: RGB) -> Image.Image:
    width, height = size
    t = np.linspace(0.0, 1.0, height)[:, None]
    rows = np.rint((1 - t) * np.asarray(top) + t * np.asarray(bottom)).astype(np.uint8)
    column = Image.fromarray(rows.reshape(height, 1, 3))
    return column.resize((width, height), Image.Resampling.NEAREST)


def _cover(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    if image.mode != "RGB":
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = flat
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


# --- the shadow -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Shadow:
    box: tuple[int, int, int, int]
    opacity: Float


def _footprint(solid: Mask) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) of the product's base: the lowest twelfth of it."""
    rows = np.flatnonzero(solid.any(axis=1))
    if len(rows) == 0:
        return None
    top, bottom = int(rows[0]), int(rows[-1])
    base = solid[max(top, bottom - max(2, (bottom - top) // 12)) : bottom + 1]
    cols = np.flatnonzero(base.any(axis=0))
    return int(cols[0]), int(cols[-1]), top, bottom


def _shadow_layer(solid: Mask, strength: float) -> _Shadow | None:
    foot = _footprint(solid)
    if foot is None:
        return None
    left, right, top, bottom = foot
    height, width = solid.shape
    rx = (right - left + 1) / 2 * 1.08 + 2
    ry = max(2.0, 0.1 * rx, 0.03 * (bottom - top))
    blur = max(1.5, 0.9 * ry)
    cx, cy = (left + right) / 2, bottom - 0.2 * ry
    margin = 3 * blur + 2
    box = (
        max(0, math.floor(cx - rx - margin)),
        max(0, math.floor(cy - ry - margin)),
        min(width, math.ceil(cx + rx + margin)),
        min(height, math.ceil(cy + ry + margin)),
    )
    if box[0] >= box[2] or box[1] >= box[3]:
        return None
    layer = Image.new("L", (box[2] - box[0], box[3] - box[1]), 0)
    draw = ImageDraw.Draw(layer)
    ox, oy = cx - box[0], cy - box[1]
    draw.ellipse((ox - rx, oy - ry, ox + rx, oy + ry), fill=150)
    # A tighter, darker core where the product meets the floor.
    draw.ellipse((ox - 0.8 * rx, oy - 0.45 * ry, ox + 0.8 * rx, oy + 0.45 * ry), fill=255)
    soft = np.asarray(layer.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    return _Shadow(box=box, opacity=(soft * (strength / 255)).astype(np.float32))


def contact_shadow(matte: Float, strength: float = SHADOW_STRENGTH) -> Float:
    """Shadow opacity in [0, strength], HxW: a soft ellipse under the product's base."""
    opacity = np.zeros(matte.shape, dtype=np.float32)
    shadow = _shadow_layer(matte >= 0.5, strength)
    if shadow is not None:
        left, top, right, bottom = shadow.box
        opacity[top:bottom, left:right] = shadow.opacity
    return opacity


def _apply_shadow(canvas: Image.Image, solid: Mask, strength: float) -> None:
    shadow = _shadow_layer(solid, strength)
    if shadow is None:
        return
    mask = Image.fromarray(np.rint(shadow.opacity * 255).astype(np.uint8))
    canvas.paste((0, 0, 0), shadow.box, mask=mask)


# --- the whole swap -------------------------------------------------------------------


def replace_background(
    img: Image.Image,
    background: Background,
    bg_image: Image.Image | None = None,
    shadow: bool = DEFAULT_SHADOW,
) -> Image.Image:
    """The product of ``img`` on ``background``, same size, RGB."""
    rgb: U8 = np.asarray(img.convert("RGB"))
    alpha: U8 | None = np.asarray(img.getchannel("A")) if img.mode == "RGBA" else None
    layer = cut_out(rgb, alpha)
    canvas = render_background(img.size, background, bg_image)
    if canvas.mode != "RGB":
        canvas = canvas.convert("RGB")
    if shadow:
        _apply_shadow(canvas, layer.alpha >= 128, SHADOW_STRENGTH)
    return Image.composite(Image.fromarray(layer.colour), canvas, Image.fromarray(layer.alpha))


# --- the provider ---------------------------------------------------------------------


def _background_of(job: Job) -> Background:
    if job.spec.background is None:
        return DEFAULT_BACKGROUND
    try:
        return parse_background(job.spec.background)
    except ValueError as exc:
        raise InvalidInput(
            [FieldError(job.line, "background", Codes.INVALID_VALUE, str(exc))]
        ) from exc


# Peak bytes per pixel of replace_background, measured on 4-64 MP images: 23-31 (the
# float mattes, the cut-out, the canvas and the encoded copy all at once).
WORK_BYTES_PER_PIXEL = 32


def _decode_background(data: bytes, ctx: ProviderContext) -> Image.Image:
    try:
        return decode_image(data, ctx.max_image_pixels, ctx.image_budget)  # only resized
    except ImageRejected as exc:
        raise ImageRejected(exc.code, f"background: {exc.message}") from exc


class LocalProvider:
    """Free, offline, deterministic; ignores prompt and the generative options."""

    name = "local"
    model = "bgswap-local-1"
    cpu_bound = True

    def estimate_cost(self, spec: JobSpec) -> float:
        return 0.0

    def step(self, job: Job, ctx: ProviderContext) -> ProviderResult:
        """The whole job in one step: a few hundred ms of CPU, nothing to wait on."""
        spec = job.spec
        background = _background_of(job)
        source = ctx.fetch(spec.image, "image")
        raw_bg = ctx.fetch(background.image, "background") if background.image else None
        fmt: OutputFormatName = spec.output_format or DEFAULT_OUTPUT_FORMAT
        quality = spec.output_quality or DEFAULT_QUALITY
        image = decode_image(source, ctx.max_image_pixels, ctx.image_budget, WORK_BYTES_PER_PIXEL)
        bg_image = _decode_background(raw_bg, ctx) if raw_bg else None
        shadow = DEFAULT_SHADOW if spec.shadow is None else spec.shadow
        result = replace_background(image, background, bg_image, shadow=shadow)
        data = encode_image(result, fmt, quality)
        output = OutputImage(
            data=data,
            content_type=CONTENT_TYPES[fmt],
            extension=EXTENSIONS[fmt],
            width=result.width,
            height=result.height,
            seed=None,
        )
        return ProviderResult(outputs=[output], cost_usd=0.0)


SPEC = ProviderSpec(
    name="local",
    # Takes every option column but uses none of those that steer a generative model.
    caps=ProviderCaps(
        max_results=1,
        style_types=frozenset(STYLE_TYPES),
        color_palette=True,
        seed=True,
        generative=False,
    ),
    make=lambda settings: LocalProvider(),
)
