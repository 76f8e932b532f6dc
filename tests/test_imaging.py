"""worker.imaging: what untrusted bytes decode to, what they are refused with, and encoding."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from worker.errors import Codes, ImageRejected
from worker.imaging import decode_image, encode_image

LIMIT = 50_000_000
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bytes(img: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _pixel(img: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def _close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


# -- modes ----------------------------------------------------------------------------


def test_rgb_png_round_trips_exactly() -> None:
    source = _noise((40, 30))
    img = decode_image(_bytes(source, "PNG"), LIMIT)
    assert img.mode == "RGB"
    assert img.size == (40, 30)
    assert np.array_equal(np.asarray(img), np.asarray(source))


def test_cmyk_jpeg_decodes_to_the_right_rgb() -> None:
    # Pillow writes CMYK JPEGs the Adobe way (inverted, APP14 marker), like Photoshop.
    data = _bytes(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).info.get("adobe") is not None
    img = decode_image(data, LIMIT)
    assert img.mode == "RGB"
    assert img.size == (64, 48)
    assert _close(_pixel(img, (30, 20)), (255, 0, 0), 8)


def test_cmyk_black_is_black() -> None:
    data = _bytes(Image.new("CMYK", (16, 16), (0, 0, 0, 255)), "JPEG", quality=95)
    assert _close(_pixel(decode_image(data, LIMIT), (8, 8)), (0, 0, 0), 8)


def test_palette_png_without_transparency_is_rgb() -> None:
    source = Image.new("RGB", (20, 10), (200, 30, 40)).quantize(colors=4)
    assert source.mode == "P"
    img = decode_image(_bytes(source, "PNG"), LIMIT)
    assert img.mode == "RGB"
    assert _close(_pixel(img, (5, 5)), (200, 30, 40), 2)


def test_palette_png_with_transparency_is_rgba() -> None:
    source = Image.new("P", (20, 10), 0)
    source.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    source.paste(1, (10, 0, 20, 10))
    img = decode_image(_bytes(source, "PNG", transparency=0), LIMIT)
    assert img.mode == "RGBA"
    assert _pixel(img, (2, 2))[3] == 0
    assert _pixel(img, (15, 2)) == (200, 100, 50, 255)


def test_greyscale_is_rgb_with_equal_channels() -> None:
    source = Image.linear_gradient("L").resize((64, 64))
    img = decode_image(_bytes(source, "PNG"), LIMIT)
    assert img.mode == "RGB"
    rgb = np.asarray(img)
    assert np.array_equal(rgb[..., 0], np.asarray(source))
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


def test_greyscale_with_alpha_is_rgba() -> None:
    source = Image.merge("LA", (Image.new("L", (8, 8), 90), Image.new("L", (8, 8), 0)))
    source.putpixel((0, 0), (90, 255))
    img = decode_image(_bytes(source, "PNG"), LIMIT)
    assert img.mode == "RGBA"
    assert _pixel(img, (0, 0)) == (90, 90, 90, 255)
    assert _pixel(img, (4, 4))[3] == 0


def test_bilevel_is_black_and_white() -> None:
    source = Image.new("1", (8, 8), 0)
    source.putpixel((3, 3), 1)
    img = decode_image(_bytes(source, "PNG"), LIMIT)
    assert img.mode == "RGB"
    assert _pixel(img, (3, 3)) == (255, 255, 255)
    assert _pixel(img, (0, 0)) == (0, 0, 0)


def _ramp16() -> np.ndarray:
    return np.rint(np.linspace(0, 65535, 256))[None, :].repeat(4, axis=0)


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16B", "TIFF"), ("I", "TIFF")])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(mode: str, fmt: str) -> None:
    ramp = _ramp16()
    if mode == "I;16B":
        source = Image.frombytes(mode, (256, 4), ramp.astype(">u2").tobytes())
    elif mode == "I":
        source = Image.fromarray(ramp.astype(np.int32))
    else:
        source = Image.fromarray(ramp.astype(np.uint16))
    assert source.mode == mode
    img = decode_image(_bytes(source, fmt), LIMIT)
    assert img.mode == "RGB"
    row = np.asarray(img)[0, :, 0].astype(int)
    # Scaled: the ramp covers 0..255 one step per column; clipping would flatten it at 255.
    assert row[0] == 0
    assert row[-1] == 255
    assert abs(row[128] - 128) <= 1
    assert np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) > 250


def test_rgba_keeps_alpha() -> None:
    source = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    source.paste((10, 200, 30, 255), (0, 0, 5, 10))
    img = decode_image(_bytes(source, "PNG"), LIMIT)
    assert img.mode == "RGBA"
    assert _pixel(img, (1, 1)) == (10, 200, 30, 255)
    assert _pixel(img, (8, 8))[3] == 0


def test_fully_opaque_alpha_is_dropped() -> None:
    source = Image.new("RGBA", (10, 10), (10, 200, 30, 255))
    img = decode_image(_bytes(source, "PNG"), LIMIT)
    assert img.mode == "RGB"


def test_exif_orientation_is_applied() -> None:
    # Upright: 20 wide, 40 tall, red on top. Stored turned a quarter left, tagged 6.
    upright = Image.new("RGB", (20, 40), (0, 0, 255))
    upright.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    assert stored.size == (40, 20)
    img = decode_image(_bytes(stored, "JPEG", quality=95, exif=exif), LIMIT)
    assert img.size == (20, 40)
    assert _close(_pixel(img, (10, 5)), (255, 0, 0), 12)
    assert _close(_pixel(img, (10, 35)), (0, 0, 255), 12)


def test_icc_profile_is_applied_and_a_broken_one_ignored() -> None:
    source = Image.new("RGB", (8, 8), (120, 180, 60))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    managed = decode_image(_bytes(source, "PNG", icc_profile=srgb), LIMIT)
    assert _close(_pixel(managed, (4, 4)), (120, 180, 60), 2)
    broken = decode_image(_bytes(source, "PNG", icc_profile=b"not a profile"), LIMIT)
    assert _pixel(broken, (4, 4)) == (120, 180, 60)


# -- refusals -------------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_a_huge_declared_size_is_refused_before_decoding() -> None:
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = PNG_MAGIC + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b"")
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, LIMIT)
    assert caught.value.code == Codes.IMAGE_TOO_LARGE
    assert "limit" in caught.value.message
    assert before == Image.MAX_IMAGE_PIXELS


def test_an_image_over_the_pixel_limit_is_refused() -> None:
    data = _bytes(Image.new("L", (3000, 3000), 255), "PNG")
    assert len(data) < 100_000
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, 1_000_000)
    assert caught.value.code == Codes.IMAGE_TOO_LARGE
    assert decode_image(data, 9_000_000).size == (3000, 3000)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused_as_truncated(fmt: str) -> None:
    data = _bytes(_noise((200, 200)), fmt)
    with pytest.raises(ImageRejected) as caught:
        decode_image(data[: len(data) // 2], LIMIT)
    assert caught.value.code == Codes.IMAGE_TRUNCATED


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8)),
        b"id,image,prompt\n1,a.png,hello\n",
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        PNG_MAGIC + b"\x00" * 20,
    ],
    ids=["empty", "random", "text", "eps", "png-header-garbage"],
)
def test_non_images_are_unreadable(data: bytes) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, LIMIT)
    assert caught.value.code == Codes.IMAGE_UNREADABLE
    assert caught.value.retryable is False
    # Short and human; nothing of the input is echoed back.
    assert len(caught.value.message) < 120
    assert "\\x" not in caught.value.message
    if data:
        assert repr(data[:8])[2:-1] not in caught.value.message


# -- encoding -------------------------------------------------------------------------


def test_formats_have_their_magic_bytes() -> None:
    img = _noise((64, 48))
    assert encode_image(img, "JPG", 90).startswith(JPEG_MAGIC)
    assert encode_image(img, "PNG", 90).startswith(PNG_MAGIC)
    webp = encode_image(img, "WEBP", 90)
    assert webp[:4] == b"RIFF"
    assert webp[8:12] == b"WEBP"


@pytest.mark.parametrize("fmt", ["JPG", "PNG", "WEBP"])
def test_encoding_is_deterministic_and_metadata_free(fmt: str) -> None:
    img = _noise((64, 48))
    img.info["exif"] = b"Exif\x00\x00junk"
    img.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    first = encode_image(img, fmt, 80)  # type: ignore[arg-type]
    assert first == encode_image(img.copy(), fmt, 80)  # type: ignore[arg-type]
    reopened = Image.open(io.BytesIO(first))
    assert "exif" not in reopened.info
    assert "icc_profile" not in reopened.info
    assert reopened.size == (64, 48)


@pytest.mark.parametrize("fmt", ["JPG", "WEBP"])
def test_lower_quality_gives_a_smaller_file(fmt: str) -> None:
    img = _noise((128, 128))
    assert len(encode_image(img, fmt, 30)) < len(encode_image(img, fmt, 95))  # type: ignore[arg-type]


def test_png_ignores_quality() -> None:
    img = _noise((32, 32))
    assert encode_image(img, "PNG", 20) == encode_image(img, "PNG", 99)


def test_jpg_composites_transparency_on_white() -> None:
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    img.paste((200, 0, 0, 255), (0, 0, 16, 32))
    decoded = Image.open(io.BytesIO(encode_image(img, "JPG", 95))).convert("RGB")
    assert _close(_pixel(decoded, (28, 16)), (255, 255, 255), 4)
    assert _close(_pixel(decoded, (4, 16)), (200, 0, 0), 8)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_png_and_webp_keep_alpha(fmt: str) -> None:
    img = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    img.paste((200, 0, 0, 255), (0, 0, 16, 32))
    decoded = decode_image(encode_image(img, fmt, 95), LIMIT)  # type: ignore[arg-type]
    assert decoded.mode == "RGBA"
    assert _pixel(decoded, (28, 16))[3] == 0
