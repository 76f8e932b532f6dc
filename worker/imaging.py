"""Safe image decoding and deterministic encoding.

``decode_image`` turns untrusted bytes into an 8-bit sRGB ``RGB`` or ``RGBA`` image, or
raises ``ImageRejected``; nothing else escapes it. ``encode_image`` writes the result
without metadata, so the same pixels always give the same bytes.

Decoding is limited to the raster formats product photos come in: Pillow can also open
EPS (through Ghostscript), PSD and a dozen scientific formats, none of which a
catalogue needs and all of which widen what hostile input can reach.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from worker.errors import Codes, ImageRejected

OutputFormatName = Literal["JPG", "PNG", "WEBP"]

_WANTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
# A fixed level rather than Pillow's default keeps the bytes stable across its releases.
PNG_COMPRESS_LEVEL = 6
WEBP_METHOD = 4
# Chroma subsampling blurs the coloured edges of a cut-out; above this quality it is off.
JPEG_FULL_CHROMA_QUALITY = 90
_WHITE = (255, 255, 255)


# What decoding costs per pixel: the decoder's buffer (up to 8 bytes for 16-bit RGBA)
# and the normalised 8-bit copy. A provider that works on the pixels says its own cost.
DECODE_BYTES_PER_PIXEL = 12
_MB = 1 << 20


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def check_image(data: bytes, max_pixels: int, budget: int | None = None) -> ImageInfo:
    """Is this an image bgswap may work on? Its header names a supported format and a
    size within ``max_pixels``, decoding fits ``budget`` bytes, and it does decode: JPEGs
    at an eighth of each side (their decoder can, at a sixty-fourth of the memory),
    other formats whole. Raises ``ImageRejected`` like ``decode_image``."""
    img = _open(data, max_pixels)
    width, height = img.size
    fmt = str(img.format)
    if fmt == "JPEG":
        img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
    else:
        _check_budget(img.size, budget, DECODE_BYTES_PER_PIXEL)
    try:
        _load(img, max_pixels)
    finally:
        img.close()
    return ImageInfo(fmt, width, height)


def _check_budget(size: tuple[int, int], budget: int | None, bytes_per_pixel: int) -> None:
    width, height = size
    needed = width * height * bytes_per_pixel
    if budget is not None and needed > budget:
        raise ImageRejected(
            Codes.IMAGE_TOO_LARGE,
            f"the image has {width}x{height} pixels: working on it takes about "
            f"{needed // _MB} MB, over the {budget // _MB} MB one image may take "
            "(BGSWAP_MAX_IMAGE_MEMORY_MB)",
        )


def _accepted_formats() -> list[str]:
    Image.init()
    return [name for name in _WANTED_FORMATS if name in Image.OPEN]


def decode_image(
    data: bytes,
    max_pixels: int,
    budget: int | None = None,
    bytes_per_pixel: int = DECODE_BYTES_PER_PIXEL,
) -> Image.Image:
    """Decode untrusted bytes into an 8-bit sRGB ``RGB`` or ``RGBA`` image, upright.

    An alpha channel that is fully opaque is dropped, so ``RGBA`` means real transparency.
    Raises ``ImageRejected`` with ``image.too_large`` (more than ``max_pixels`` pixels, a
    decompression bomb, or more than ``budget`` bytes at ``bytes_per_pixel``: checked from
    the header, before a pixel is allocated), ``image.truncated`` or ``image.unreadable``.
    """
    img = _open(data, max_pixels)
    _check_budget(img.size, budget, bytes_per_pixel)
    _load(img, max_pixels)
    try:
        return _normalise(img)
    except ImageRejected:
        raise
    except Exception as exc:
        # A decoder tripping over hostile input is still just an unreadable image.
        raise ImageRejected(Codes.IMAGE_UNREADABLE, "the image could not be decoded") from exc


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageRejected(Codes.IMAGE_UNREADABLE, "the image is empty")
    try:
        img = Image.open(io.BytesIO(data), formats=_accepted_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(None, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(
            Codes.IMAGE_UNREADABLE,
            "not a supported image (JPEG, PNG, WEBP, GIF, BMP, TIFF)",
        ) from exc
    except Exception as exc:
        raise ImageRejected(Codes.IMAGE_UNREADABLE, "the image header is unreadable") from exc
    _check_size(img.size, max_pixels)
    return img


def _check_size(size: tuple[int, int], max_pixels: int) -> None:
    # Checked here, before any pixel is decoded, and against our own limit: Pillow's
    # MAX_IMAGE_PIXELS is a process-wide global that threads would race on.
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageRejected(Codes.IMAGE_UNREADABLE, "the image has no pixels")
    if width * height > max_pixels:
        raise _too_large(size, max_pixels)


def _too_large(size: tuple[int, int] | None, max_pixels: int) -> ImageRejected:
    what = f"{size[0]}x{size[1]} pixels" if size else "too many pixels"
    return ImageRejected(
        Codes.IMAGE_TOO_LARGE, f"the image has {what}, above the limit of {max_pixels:,}"
    )


def _load(img: Image.Image, max_pixels: int) -> None:
    try:
        img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_large(img.size, max_pixels) from exc
    except (OSError, EOFError) as exc:
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
            raise ImageRejected(Codes.IMAGE_TRUNCATED, "the image data is truncated") from exc
        raise ImageRejected(Codes.IMAGE_UNREADABLE, "the image data is corrupt") from exc
    except Exception as exc:
        raise ImageRejected(Codes.IMAGE_UNREADABLE, "the image data is corrupt") from exc
    # Some decoders only learn the real size while loading.
    _check_size(img.size, max_pixels)


def _normalise(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    img = _upright(img)
    img = _to_8bit(img)
    alpha = img.getchannel("A") if img.mode in ("RGBA", "LA") else None
    colour = img.getchannel("L") if img.mode == "LA" else img
    if colour.mode == "RGBA":
        colour = colour.convert("RGB")
    rgb = _to_srgb(colour, icc if isinstance(icc, bytes) else None)
    if alpha is not None and alpha.getextrema() != (255, 255):
        rgb.putalpha(alpha)
    return rgb


def _upright(img: Image.Image) -> Image.Image:
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception:
        # A malformed EXIF block should not cost the picture; show it as stored.
        return img
    return upright if upright is not None else img


def _to_8bit(img: Image.Image) -> Image.Image:
    """Reduce every mode to one of RGB, RGBA, L, LA, CMYK (8 bits per channel)."""
    mode = img.mode
    if mode in ("RGB", "RGBA", "L", "LA", "CMYK"):
        return img
    if mode == "P":
        has_alpha = "transparency" in img.info or (img.palette and img.palette.mode == "RGBA")
        return img.convert("RGBA" if has_alpha else "RGB")
    if mode.startswith("I") or mode == "F":
        return _scale_to_l(img)
    simple = {"1": "L", "PA": "RGBA", "RGBa": "RGBA", "La": "LA", "RGBX": "RGB"}
    if mode in simple:
        return img.convert(simple[mode])
    return img.convert("RGBA" if "A" in img.getbands() else "RGB")


def _scale_to_l(img: Image.Image) -> Image.Image:
    """16- and 32-bit greyscale to 8 bits by scaling the full range, not by clipping."""
    values = np.asarray(img)
    if img.mode == "F":
        peak = 1.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 255.0
        scaled = np.nan_to_num(values, nan=0.0) * (255.0 / peak)
    else:
        # 16-bit samples, whichever byte order, and "I" holding them (older PNG readers).
        scaled = values.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _to_srgb(colour: Image.Image, icc: bytes | None) -> Image.Image:
    """Colour-manage L, RGB or CMYK into sRGB when a profile is embedded."""
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            target = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(
                colour,
                source,
                target,
                renderingIntent=ImageCms.Intent.PERCEPTUAL,
                outputMode="RGB",
            )
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            # A broken or mismatched profile: the unmanaged colours are the best guess.
            converted = None
        if converted is not None:
            return converted
    return colour.convert("RGB")


def encode_image(img: Image.Image, output_format: OutputFormatName, quality: int) -> bytes:
    """Encode without metadata so that identical pixels give identical bytes.

    JPG has no alpha: transparent pixels are composited on white. PNG is lossless and
    ignores ``quality``; JPG and WEBP honour it.
    """
    clean = _plain_copy(img, keep_alpha=output_format != "JPG")
    buffer = io.BytesIO()
    if output_format == "JPG":
        subsampling = 0 if quality >= JPEG_FULL_CHROMA_QUALITY else 2
        clean.save(buffer, "JPEG", quality=quality, subsampling=subsampling, optimize=False)
    elif output_format == "PNG":
        clean.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    elif output_format == "WEBP":
        clean.save(buffer, "WEBP", quality=quality, method=WEBP_METHOD, exact=False)
    else:
        raise ValueError(f"unsupported output format {output_format!r}")
    return buffer.getvalue()


def _plain_copy(img: Image.Image, *, keep_alpha: bool) -> Image.Image:
    """RGB or RGBA pixels only: no info dict, so no EXIF, ICC, text chunks or dates."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        if keep_alpha:
            plain = rgba
        else:
            plain = Image.new("RGB", img.size, _WHITE)
            plain.paste(rgba, mask=rgba.getchannel("A"))
    else:
        plain = img.convert("RGB")
    return Image.frombytes(plain.mode, plain.size, plain.tobytes())
