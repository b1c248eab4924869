"""Image bytes to model input: decode safely, normalise the mode, resize, normalise the pixels."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFile, ImageOps, TiffImagePlugin, UnidentifiedImageError

from tandem.errors import (
    ImageTooComplex,
    ImageTooLarge,
    ImageTooSmall,
    InvalidImage,
    UnsupportedImageFormat,
)
from tandem.runtime.containers import container_parts, jpeg_scans
from tandem.runtime.manifest import Layout, Preprocess, Resize

_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}

# Pillow raises OSError for truncated data, ValueError or SyntaxError for some broken headers.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError)


# What the service promises to read. Pillow opens more, but every extra parser is attack surface.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
GRAY_BAND_ROWS = 256

# Pillow reads an uncompressed TIFF as one tile per strip, each a Python object made at open
# and a decoder run at load: 12 MB holding 1.5 million strips of one row took 16 s and 580 MB
# to decode. libtiff, which Pillow uses for every compressed TIFF already, took 0.3 s and
# 125 MB. Decoding only, and the same pixels (a test compares them).
TiffImagePlugin.READ_LIBTIFF = True


@dataclass(frozen=True, slots=True)
class ImageLimits:
    max_pixels: int = 40_000_000
    min_side: int = 8
    # Encoders write 6 to 18 scans (libjpeg's progression); each costs a pass over the image.
    max_jpeg_scans: int = 100
    # Far above what any encoder writes (a 16 MB PNG in libpng's 8 KB chunks has 2,000), and
    # at most about 0.3 s of Pillow's parsing.
    max_parts: int = 65_536


def decode_image(
    data: bytes, limits: ImageLimits = ImageLimits(), min_side: int | None = None
) -> Image.Image:
    """Decode to an upright RGB image, or raise a typed error; never decode a pixel bomb.

    The format and the size come from the header and are checked before any pixel is decoded.
    Animated images give their first frame. With `min_side`, a JPEG is decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) whose short side is still at least that: a large photo costs
    little more to decode than the model's input.
    """
    image = _open(data, limits)
    if min_side is not None and image.format == "JPEG":
        _draft(image, min_side)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            # In place: otherwise an image with no orientation to apply is copied whole.
            ImageOps.exif_transpose(image, in_place=True)
            return to_rgb(image)
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"the image could not be decoded: {exc}") from exc


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    if not data:
        raise InvalidImage("the image is empty")
    _check_parts(data, limits.max_parts)  # before Pillow walks them
    try:
        with warnings.catch_warnings():
            # Our own limits are checked next; Pillow's milder guard would only warn here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        # Pillow's own guard fires in open() for headers past twice its limit.
        raise ImageTooLarge(
            f"the image has too many pixels: {exc}", max_pixels=limits.max_pixels
        ) from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage("the data is not an image in a supported format") from exc
    if image.format not in SUPPORTED_FORMATS:
        raise UnsupportedImageFormat(
            f"{image.format} images are not accepted",
            format=image.format,
            supported=sorted(SUPPORTED_FORMATS - {"MPO"}),
        )
    _check_decoder(image)
    _check_size(*image.size, limits)
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        _check_scans(data, limits.max_jpeg_scans)
    return image


def _check_decoder(image: ImageFile.ImageFile) -> None:
    # Pillow's decoders written in Python hold the interpreter for the whole decode: a 16 MB
    # RLE-compressed BMP took 4.5 s, and every other request was 12 times slower meanwhile.
    # Of the accepted formats only BMP's RLE compression has such a decoder.
    python_decoded = sorted({tile.codec_name for tile in image.tile} & Image.DECODERS.keys())
    if python_decoded:
        raise UnsupportedImageFormat(
            f"{image.format} images with this compression ({', '.join(python_decoded)}) are not"
            " accepted: their decoder would hold up every other request; send it uncompressed",
            format=image.format,
            compression=python_decoded,
            supported=sorted(SUPPORTED_FORMATS - {"MPO"}),
        )


def _draft(image: Image.Image, min_side: int) -> None:
    width, height = image.size
    scale = min_side / min(width, height)
    if scale < 1:
        # draft() picks the largest reduction that keeps both sides at least the requested size.
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"the image has {width}x{height} pixels; at most {limits.max_pixels} are accepted",
            width=width,
            height=height,
            max_pixels=limits.max_pixels,
        )
    if min(width, height) < limits.min_side:
        raise ImageTooSmall(
            f"the image is {width}x{height}; both sides must be at least {limits.min_side} pixels",
            width=width,
            height=height,
            min_side=limits.min_side,
        )


def _check_parts(data: bytes, max_parts: int) -> None:
    parts = container_parts(data, stop_after=max_parts)
    if parts is not None and parts.count > max_parts:
        raise ImageTooComplex(
            f"the {parts.format} file has more than {max_parts} {parts.what}",
            max_parts=max_parts,
        )


def _check_scans(data: bytes, max_scans: int) -> None:
    # A progressive scan can cover every block of the image in a few bytes (EOB runs), and
    # the decoder passes over them all for each: 2,000 scans in 354 KB took 80 s at 40 MP.
    if jpeg_scans(data, stop_after=max_scans) > max_scans:
        raise ImageTooComplex(
            f"the progressive JPEG has more than {max_scans} scans; "
            "each costs the decoder a pass over the whole image",
            max_scans=max_scans,
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is laid over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _to_8bit_gray(image)
    if image.mode in ("P", "PA", "RGBa"):
        image = image.convert("RGBA")
    elif image.mode == "La":
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA"):
        image = _over_white(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _over_white(image: Image.Image) -> Image.Image:
    """The same pixels as alpha_composite over white, without the alpha band, with one buffer
    the image's size beside it instead of three: 304 MB against 758 for a 40 MP RGBA PNG."""
    canvas = Image.new(image.mode[:-1], image.size, "white")
    canvas.paste(image, mask=image)
    return canvas


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    # Pillow clips deep images to 255 when converting; scale the real range down instead.
    pixels = np.asarray(image)
    top = float(pixels.max()) if pixels.size else 0.0
    limit = 65535.0 if top > 255 else 255.0
    gray = np.empty(pixels.shape, dtype=np.uint8)
    # A band of rows at a time: float64 temporaries of the whole image took a 40 MP 16-bit
    # PNG's decoding to 986 MB.
    for start in range(0, len(pixels), GRAY_BAND_ROWS):
        band = pixels[start : start + GRAY_BAND_ROWS].astype(np.float64)
        gray[start : start + GRAY_BAND_ROWS] = np.clip(band / limit * 255.0, 0, 255)
    return Image.fromarray(gray, mode="L")


def resize_for(image: Image.Image, spec: Preprocess) -> Image.Image:
    method = _INTERPOLATION[spec.interpolation]
    if spec.resize is Resize.STRETCH:
        return image.resize((spec.size, spec.size), method)
    short = spec.resize_size or spec.size
    width, height = image.size
    scale = short / min(width, height)
    new_w, new_h = max(short, round(width * scale)), max(short, round(height * scale))
    left, top = (new_w - spec.size) // 2, (new_h - spec.size) // 2
    # Resample only the source region under the centre crop, at the full resize's scale: the
    # same pixels as resizing the whole image and cropping (Pillow's filters still read past
    # the region's edges), for half the work on a typical photo.
    sx, sy = width / new_w, height / new_h
    region = (left * sx, top * sy, (left + spec.size) * sx, (top + spec.size) * sy)
    return image.resize((spec.size, spec.size), method, box=region)


def to_tensor(image: Image.Image, spec: Preprocess) -> npt.NDArray[np.float32]:
    """One HWC or CHW float32 array, normalised as the manifest says."""
    resized = resize_for(image, spec)
    pixels = np.asarray(resized)  # HWC, uint8
    if spec.channels == "BGR":
        pixels = pixels[..., ::-1]  # a view: the copy below takes the channels in this order
    mean = np.asarray(spec.mean, dtype=np.float32)
    inv_std = 1.0 / np.asarray(spec.std, dtype=np.float32)
    if spec.layout is Layout.NCHW:
        pixels = pixels.transpose(2, 0, 1)
        mean, inv_std = mean[:, np.newaxis], inv_std[:, np.newaxis]
    else:  # each row holds its pixels' channels in turn
        mean, inv_std = np.tile(mean, resized.width), np.tile(inv_std, resized.width)
    # Cast into the final layout in one pass, then normalise in place, rows by long contiguous
    # runs: the same values, bit for bit, as (pixels * scale - mean) / std over the HWC array
    # with temporaries, in a tenth of the time (0.09 against 0.8 ms at 224x224: numpy
    # broadcasts slowly over a trailing axis of 3).
    tensor = np.empty(pixels.shape, dtype=np.float32)
    tensor[...] = pixels
    rows = tensor.reshape(len(tensor), -1)
    rows *= np.float32(spec.scale)
    rows -= mean
    rows *= inv_std
    return tensor
