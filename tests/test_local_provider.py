"""The offline `local` provider: pixels of the cut-out and the composite, and the provider."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from examples.make_examples import (
    EXAMPLES,
    KINDS,
    LIGHT_BLUE,
    LIGHT_GREY,
    WHITE,
    product_layer,
    product_shot,
    write_examples,
)
from worker.errors import Codes, ImageRejected
from worker.imaging import decode_image
from worker.jobs import DEFAULT_BACKGROUND, Background, Job, JobSpec, parse_background
from worker.providers.base import ProviderContext
from worker.providers.local import (
    SHADOW_STRENGTH,
    LocalProvider,
    contact_shadow,
    estimate_backdrop,
    product_matte,
    render_background,
    replace_background,
)

SIZE = (320, 320)
GREEN = (20, 120, 60)
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(int)


def _truth(kind: str, seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    return np.asarray(product_layer(kind, size, seed))[..., 3].astype(np.float32) / 255


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(np.asarray(img.filter(ImageFilter.MinFilter(2 * radius + 1))) == 255)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(np.asarray(img.filter(ImageFilter.MaxFilter(2 * radius + 1))) == 255)


def _solid(colour: tuple[int, int, int]) -> Background:
    return Background(colours=(colour,))


# -- the matte ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backdrop", [WHITE, LIGHT_GREY, LIGHT_BLUE], ids=["white", "grey", "blue"])
def test_matte_matches_the_drawn_product(kind: str, backdrop: tuple[int, int, int]) -> None:
    seed = 11 + KINDS.index(kind)
    shot = np.asarray(product_shot(kind, SIZE, backdrop, seed))
    matte = product_matte(shot)
    truth = _truth(kind, seed)
    assert matte.shape == truth.shape
    assert matte.dtype == np.float32
    assert float(np.abs(matte - truth).mean()) < 0.01
    found, real = matte >= 0.5, truth >= 0.5
    # The mug's handle gap and the ring's hole count here: filling them costs > 5%.
    assert (found & real).sum() / (found | real).sum() > 0.98


def test_matte_is_soft_along_the_edges_only() -> None:
    shot = np.asarray(product_shot("bottle", SIZE, WHITE, 5))
    matte = product_matte(shot)
    truth = _truth("bottle", 5)
    soft = (matte > 0.02) & (matte < 0.98)
    assert soft.sum() > 200
    edge = _dilate((truth > 0.02) & (truth < 0.98), 2)
    assert soft[~edge].sum() <= 0.02 * soft.sum()
    # Not a threshold in disguise: plenty of values in the middle.
    assert ((matte > 0.25) & (matte < 0.75)).sum() > 50


def test_specks_in_the_backdrop_do_not_survive() -> None:
    shot = np.asarray(product_shot("box", SIZE, WHITE, 3)).copy()
    specks = [(12, 40), (30, 290), (300, 20), (290, 300), (160, 8)]
    for y, x in specks:
        shot[y : y + 3, x : x + 3] = (20, 20, 20)
    shot[100, 15] = (255, 0, 0)
    matte = product_matte(shot)
    for y, x in [*specks, (100, 15)]:
        assert matte[y : y + 3, x : x + 3].max() == 0
    out = _rgb(replace_background(Image.fromarray(shot), _solid(GREEN), shadow=False))
    for y, x in specks:
        assert np.abs(out[y : y + 3, x : x + 3] - GREEN).max() <= 1


def _frame_with_window(window: int) -> np.ndarray:
    """A dark 200x200 frame on white, with a white square window of ``window`` pixels."""
    img = np.full((256, 256, 3), 250, dtype=np.uint8)
    img[28:228, 28:228] = (40, 50, 60)
    lo = 128 - window // 2
    img[lo : lo + window, lo : lo + window] = 250
    return img


def test_small_enclosed_backdrop_coloured_regions_are_product() -> None:
    # A highlight or white print: enclosed and small, so it is kept (alpha 1).
    matte = product_matte(_frame_with_window(6))
    assert matte[125:131, 125:131].min() == 1.0


def test_large_enclosed_holes_show_the_new_background() -> None:
    matte = product_matte(_frame_with_window(80))
    assert matte[100:156, 100:156].max() == 0.0
    assert matte[40:60, 40:60].min() == 1.0


def test_ring_hole_shows_the_new_background() -> None:
    shot = product_shot("ring", SIZE, LIGHT_GREY, 2)
    truth = _truth("ring", 2)
    rows = np.flatnonzero((truth > 0.5).any(axis=1))
    cols = np.flatnonzero((truth > 0.5).any(axis=0))
    cy, cx = (rows[0] + rows[-1]) // 2, (cols[0] + cols[-1]) // 2
    assert truth[cy, cx] == 0
    out = _rgb(replace_background(shot, _solid(GREEN), shadow=False))
    assert np.abs(out[cy - 10 : cy + 10, cx - 10 : cx + 10] - GREEN).max() <= 1


def test_an_input_with_transparency_uses_its_alpha() -> None:
    layer = product_layer("ring", SIZE, 4)
    alpha = np.asarray(layer)[..., 3]
    out = _rgb(replace_background(layer, _solid(GREEN), shadow=False))
    assert np.abs(out[alpha == 0] - GREEN).max() == 0
    inside = alpha == 255
    assert np.array_equal(out[inside], np.asarray(layer)[..., :3][inside].astype(int))


def test_backdrop_estimate_follows_a_vignette() -> None:
    shot = np.asarray(product_shot("box", SIZE, LIGHT_BLUE, 8))
    backdrop = estimate_backdrop(shot)
    plate = backdrop.plate(*SIZE).astype(int)
    truth = _truth("box", 8)
    far = ~_dilate(truth > 0, 6)
    assert np.abs(plate[far] - shot[far]).sum(axis=1).mean() < 6
    assert backdrop.tolerance < 30
    # The median border colour: the vignette darkens the border a little.
    assert np.abs(np.asarray(backdrop.colour) - LIGHT_BLUE).max() < 20


def test_a_product_cut_by_the_border_is_still_found() -> None:
    img = np.full((200, 300, 3), 245, dtype=np.uint8)
    img[120:, :] = (60, 30, 20)  # a table top across the whole bottom
    img[40:120, 100:180] = (30, 60, 150)
    matte = product_matte(img)
    assert matte[150:, :].min() == 1.0
    assert matte[:30, :].max() == 0.0
    assert matte[60:100, 120:160].min() == 1.0


def test_an_empty_backdrop_gives_just_the_background() -> None:
    plain = np.full((120, 160, 3), 230, dtype=np.uint8)
    plain += np.random.default_rng(0).integers(0, 3, plain.shape, dtype=np.uint8)
    assert product_matte(plain).max() == 0
    out = _rgb(replace_background(Image.fromarray(plain), _solid(GREEN), shadow=True))
    assert np.abs(out - GREEN).max() == 0


# -- the composite --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bottle", "mug", "sneaker"])
def test_backdrop_becomes_the_new_colour_and_the_product_stays(kind: str) -> None:
    shot = product_shot(kind, SIZE, WHITE, 21)
    out = replace_background(shot, _solid(GREEN), shadow=False)
    assert out.size == shot.size
    assert out.mode == "RGB"
    result, source = _rgb(out), _rgb(shot)
    truth = _truth(kind, 21)
    far = ~_dilate(truth > 0, 4)
    assert np.abs(result[far] - GREEN).max() <= 1
    interior = _erode(truth >= 1.0, 8)
    assert interior.sum() > 1000
    assert np.abs(result[interior] - source[interior]).max() <= 1


def test_no_halo_of_the_old_backdrop_around_the_product() -> None:
    shot = product_shot("box", SIZE, WHITE, 6)
    out = _rgb(replace_background(shot, _solid((0, 0, 0)), shadow=False))
    truth = _truth("box", 6)
    rim = _dilate(truth > 0, 2) & (truth == 0)
    # The white backdrop would show as bright pixels on the black background.
    assert out[rim].max(axis=1).mean() < 12
    edge = (truth > 0.1) & (truth < 0.9)
    expected = truth[edge] * _rgb(product_layer("box", SIZE, 6))[edge].max(axis=1)
    assert np.abs(out[edge].max(axis=1) - expected).mean() < 25


def test_size_is_kept_for_a_non_square_image() -> None:
    shot = product_shot("sneaker", (300, 180), WHITE, 9)
    assert replace_background(shot, DEFAULT_BACKGROUND).size == (300, 180)


def test_the_same_input_gives_the_same_pixels() -> None:
    shot = product_shot("mug", SIZE, LIGHT_BLUE, 10)
    background = parse_background("#ff0000,#0000ff")
    first = replace_background(shot, background, shadow=True).tobytes()
    assert first == replace_background(shot.copy(), background, shadow=True).tobytes()


def test_a_gradient_runs_from_top_to_bottom() -> None:
    img = render_background((50, 101), Background(colours=((255, 0, 0), (0, 0, 255))))
    pixels = _rgb(img)
    assert img.size == (50, 101)
    assert (pixels[0] == (255, 0, 0)).all()
    assert (pixels[-1] == (0, 0, 255)).all()
    assert np.abs(pixels[50] - (128, 0, 128)).max() <= 1
    assert (np.diff(pixels[:, 0, 0]) <= 0).all()

    shot = product_shot("ring", SIZE, WHITE, 1)
    out = _rgb(replace_background(shot, parse_background("#ffffff,#000000"), shadow=False))
    assert (out[0, :5] >= 254).all()
    assert (out[-1, :5] <= 1).all()


def test_a_solid_colour_and_the_default() -> None:
    assert _rgb(render_background((4, 3), _solid(GREEN)))[1, 1].tolist() == list(GREEN)
    default = _rgb(render_background((10, 30), Background()))
    assert default[0, 0].tolist() == list(DEFAULT_BACKGROUND.colours[0])
    assert default[-1, 0].tolist() == list(DEFAULT_BACKGROUND.colours[1])


def _halves(size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 255, 0), (size[0] // 2, 0, size[0], size[1]))
    return img


def test_an_image_background_covers_and_is_centred() -> None:
    background = Background(image="products/scene.jpg")
    # Wider than the target: scaled to the height, the middle kept.
    out = render_background((80, 80), background, _halves((100, 50)))
    assert out.size == (80, 80)
    pixels = _rgb(out)
    assert np.abs(pixels[40, 5] - (255, 0, 0)).max() <= 2
    assert np.abs(pixels[40, 75] - (0, 255, 0)).max() <= 2
    # Smaller than the target: enlarged until it covers, no borders.
    small = _rgb(render_background((300, 200), background, _halves((30, 40))))
    assert (small[..., 0] + small[..., 1] >= 200).all()
    assert (small[..., 2] <= 8).all()
    with pytest.raises(ValueError, match="background image"):
        render_background((10, 10), background, None)


def test_shadow_darkens_below_the_product_only() -> None:
    shot = product_shot("box", SIZE, WHITE, 12)
    with_shadow = _rgb(replace_background(shot, _solid((200, 200, 200)), shadow=True))
    without = _rgb(replace_background(shot, _solid((200, 200, 200)), shadow=False))
    truth = _truth("box", 12)
    rows = np.flatnonzero((truth > 0.5).any(axis=1))
    cols = np.flatnonzero(truth[rows[-1] - 3] > 0.5)
    below = with_shadow[rows[-1] + 3, cols[len(cols) // 2]]
    assert (below < 200 - 20).all()
    assert np.array_equal(with_shadow[:20], without[:20])
    assert np.array_equal(with_shadow[:, :5], without[:, :5])

    opacity = contact_shadow(product_matte(np.asarray(shot)))
    assert 0.2 < opacity.max() <= SHADOW_STRENGTH
    assert opacity[: rows[0]].max() == 0
    assert contact_shadow(np.zeros((30, 30), dtype=np.float32)).max() == 0


# -- the provider ---------------------------------------------------------------------


class _Fetcher:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.calls: list[tuple[str, str]] = []

    def __call__(self, ref: str, field: str) -> bytes:
        self.calls.append((ref, field))
        return self.files[ref]


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def _job(**options: object) -> Job:
    spec = JobSpec(id="sku-1", image="shot.png", prompt="a product", **options)
    return Job(batch_id="b1", index=0, line=2, spec=spec, dest="/tmp/out/sku-1")


def _context(files: dict[str, bytes]) -> tuple[ProviderContext, _Fetcher]:
    fetch = _Fetcher(files)
    return ProviderContext(fetch=fetch, max_image_pixels=4_000_000), fetch


@pytest.fixture(scope="module")
def shot_png() -> bytes:
    return _png(product_shot("bottle", (240, 300), WHITE, 7))


def test_provider_defaults(shot_png: bytes) -> None:
    provider = LocalProvider()
    assert (provider.name, provider.model) == ("local", "bgswap-local-1")
    ctx, fetch = _context({"shot.png": shot_png})
    job = _job()
    assert provider.estimate_cost(job.spec) == 0.0
    result = provider.step(job, ctx)
    assert fetch.calls == [("shot.png", "image")]
    assert result.cost_usd == 0.0
    [output] = result.outputs
    assert output.data.startswith(b"\xff\xd8\xff")
    assert (output.content_type, output.extension) == ("image/jpeg", "jpg")
    assert (output.width, output.height, output.seed) == (240, 300, None)
    img = Image.open(io.BytesIO(output.data))
    assert img.size == (240, 300)
    top, bottom = DEFAULT_BACKGROUND.colours
    pixels = _rgb(img)
    assert np.abs(pixels[1, 1] - top).max() <= 4
    assert np.abs(pixels[-2, 1] - bottom).max() <= 4
    assert provider.step(job, ctx).outputs[0].data == output.data


@pytest.mark.parametrize(
    ("fmt", "magic", "content_type"),
    [
        ("PNG", b"\x89PNG", "image/png"),
        ("WEBP", b"RIFF", "image/webp"),
        ("JPG", b"\xff\xd8", "image/jpeg"),
    ],
)
def test_provider_output_format(shot_png: bytes, fmt: str, magic: bytes, content_type: str) -> None:
    ctx, _ = _context({"shot.png": shot_png})
    [output] = LocalProvider().step(_job(output_format=fmt, background="#102030"), ctx).outputs
    assert output.data.startswith(magic)
    assert output.content_type == content_type
    assert output.extension == fmt.lower()
    corner = _rgb(Image.open(io.BytesIO(output.data)))[2, 2]
    assert np.abs(corner - (0x10, 0x20, 0x30)).max() <= 4


@pytest.mark.parametrize("fmt", ["JPG", "WEBP"])
def test_provider_quality_is_honoured(shot_png: bytes, fmt: str) -> None:
    ctx, _ = _context({"shot.png": shot_png})
    low = LocalProvider().step(_job(output_format=fmt, output_quality=25), ctx)
    high = LocalProvider().step(_job(output_format=fmt, output_quality=95), ctx)
    assert len(low.outputs[0].data) < len(high.outputs[0].data)


def test_provider_fetches_and_covers_with_a_background_image(shot_png: bytes) -> None:
    ctx, fetch = _context({"shot.png": shot_png, "scene.png": _png(_halves((60, 40)))})
    job = _job(background="scene.png", shadow=False, output_format="PNG")
    [output] = LocalProvider().step(job, ctx).outputs
    assert ("scene.png", "background") in fetch.calls
    pixels = _rgb(Image.open(io.BytesIO(output.data)))
    assert pixels.shape == (300, 240, 3)
    assert np.abs(pixels[5, 5] - (255, 0, 0)).max() <= 2
    assert np.abs(pixels[5, -5] - (0, 255, 0)).max() <= 2


def test_provider_refuses_bad_images(shot_png: bytes) -> None:
    ctx, _ = _context({"shot.png": b"not an image", "bg.png": shot_png[:200]})
    with pytest.raises(ImageRejected) as caught:
        LocalProvider().step(_job(), ctx)
    assert caught.value.code == Codes.IMAGE_UNREADABLE

    ctx, _ = _context({"shot.png": shot_png, "bg.png": shot_png[: len(shot_png) // 2]})
    with pytest.raises(ImageRejected) as caught:
        LocalProvider().step(_job(background="bg.png"), ctx)
    assert caught.value.code == Codes.IMAGE_TRUNCATED
    assert caught.value.message.startswith("background")

    small = ProviderContext(fetch=_Fetcher({"shot.png": shot_png}), max_image_pixels=10_000)
    with pytest.raises(ImageRejected) as caught:
        LocalProvider().step(_job(), small)
    assert caught.value.code == Codes.IMAGE_TOO_LARGE


# -- the examples ---------------------------------------------------------------------


def test_examples_cover_the_decoder_cases_and_match_the_manifest(tmp_path: Path) -> None:
    paths = write_examples(tmp_path, scale=0.2)
    assert [p.name for p in paths] == [e.filename for e in EXAMPLES]
    modes = {p.name: Image.open(p).mode for p in paths}
    assert modes["bottle_cmyk.jpg"] == "CMYK"
    assert modes["box_palette.png"] == "P"
    assert modes["mug_greyscale.png"] == "L"
    assert modes["sneaker_16bit.png"].startswith("I;16")
    assert modes["ring_transparent.png"] == "RGBA"
    assert Image.open(tmp_path / "bottle_rotated.jpg").getexif().get(0x0112) == 6
    for path in paths:
        img = decode_image(path.read_bytes(), 10_000_000)
        assert img.mode in ("RGB", "RGBA")
    upright = decode_image((tmp_path / "bottle_rotated.jpg").read_bytes(), 10_000_000)
    assert upright.height > upright.width

    with (EXAMPLES_DIR / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert 10 <= len(rows) <= 20
    assert set(rows[0]) == {
        "id",
        "image",
        "prompt",
        "background",
        "shadow",
        "output_format",
        "category",
    }
    written = {f"products/{p.name}" for p in paths}
    assert {row["image"] for row in rows} <= written
    image_backgrounds = [r["background"] for r in rows if r["background"].startswith("products/")]
    assert image_backgrounds and set(image_backgrounds) <= written
    assert any("," in r["background"] for r in rows)
    assert all("{category}" in r["prompt"] for r in rows)
    assert {r["output_format"] for r in rows} >= {"JPG", "PNG", "WEBP"}


def test_product_shots_are_deterministic() -> None:
    first = product_shot("sneaker", (200, 150), LIGHT_BLUE, 3).tobytes()
    assert first == product_shot("sneaker", (200, 150), LIGHT_BLUE, 3).tobytes()
    assert first != product_shot("sneaker", (200, 150), LIGHT_BLUE, 4).tobytes()
    with pytest.raises(ValueError, match="unknown product kind"):
        product_shot("teapot", (50, 50), WHITE, 0)
