from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tandem.errors import (
    ImageTooComplex,
    ImageTooLarge,
    InvalidImage,
    UnsupportedImageFormat,
)
from tandem.runtime.imaging import ImageLimits, decode_image, resize_for, to_rgb, to_tensor
from tandem.runtime.manifest import Layout, Preprocess, Resize
from tests.support import (
    encode,
    noise,
    png_chunk,
    png_header_only,
    progressive_jpeg,
    python_output,
    rle_bmp,
)

LIMIT = ImageLimits(max_pixels=10_000_000, min_side=1)


@pytest.mark.parametrize("mode", ["L", "1", "RGBA", "LA", "P", "CMYK", "I", "I;16", "RGB"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode == "I" else "PNG"
    image = Image.new("RGB", (20, 10), (200, 40, 10)).convert(mode)
    decoded = decode_image(encode(image, fmt), LIMIT)
    assert decoded.mode == "RGB"
    assert decoded.size == (20, 10)


def test_transparency_is_laid_over_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    decoded = decode_image(encode(image, "PNG"), LIMIT)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_over_white_is_alpha_compositing(mode: str) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8), "RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    image = image.convert(mode)
    expected = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    decoded = decode_image(encode(image, "PNG"), LIMIT)
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_deep_grey_is_scaled_as_the_formula_says() -> None:
    pixels = np.random.default_rng(0).integers(0, 65536, (600, 50), dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(pixels), "PNG"), LIMIT)
    expected = np.clip(pixels / 65535.0 * 255.0, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(decoded)[..., 0], expected)


def _png(width: int, height: int, pixel: bytes, colour_type: int, depth: int = 8) -> bytes:
    """A PNG of one colour, compressed row by row: a big image without holding its pixels."""
    packer = zlib.compressobj()
    row = b"\x00" + pixel * width  # filter type 0
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", data)
        + png_chunk(b"IEND")
    )


PEAK_OF_A_DECODE = """
import resource, sys
from tandem.runtime.imaging import ImageLimits, decode_image
data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decode_image(data, ImageLimits(max_pixels=40_000_000), 292)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def _peak_of_a_decode(path: Path) -> int:
    """Bytes of resident memory that decoding the file adds at its peak, in a new process."""
    return int(python_output(PEAK_OF_A_DECODE, str(path), timeout=100)) * 1024


@pytest.mark.parametrize(
    ("pixel", "colour_type", "depth", "bytes_per_pixel"),
    [
        # RGBA: decoded, and the RGB it becomes (it had been 17.5 bytes a pixel)
        (bytes((200, 40, 10, 128)), 6, 8, 8.8),
        # grey and alpha: decoded, over white, as RGB (11.5)
        (bytes((200, 128)), 4, 8, 10),
        # 16-bit grey: decoded, as numpy, as 8 bits (24.8: float64 copies of the whole image)
        (bytes((128, 0)), 0, 16, 8),
    ],
    ids=["rgba", "grey-alpha", "grey-16"],
)
def test_a_large_png_decodes_without_copies_of_itself_to_spare(
    tmp_path: Path,
    pixel: bytes,
    colour_type: int,
    depth: int,
    bytes_per_pixel: float,
) -> None:
    """Resident memory at the peak of one decode: sixteen 40 MP RGBA PNGs of 170 KB each,
    sent at once, had taken a proxy from 0.27 to 3.35 GB."""
    side = 6300  # 39.7 MP, under the default limit of 40
    path = tmp_path / "big.png"
    path.write_bytes(_png(side, side, pixel, colour_type, depth))
    assert _peak_of_a_decode(path) / side**2 < bytes_per_pixel


def _tiff_of_strips(width: int, strips: int) -> bytes:
    """An uncompressed RGB TIFF of `strips` one-row strips, all pointing at the same row."""
    row, table = 8, 8 + width * 3
    offsets = struct.pack(f"<{strips}I", *[row] * strips)
    counts = struct.pack(f"<{strips}I", *[width * 3] * strips)
    ifd = table + 2 * len(offsets)
    tags = [  # (tag, type, count, value): LONG 4, SHORT 3
        (256, 4, 1, width),
        (257, 4, 1, strips),
        (258, 3, 3, ifd + 2 + 12 * 9 + 4),  # bits per sample, after the IFD
        (259, 3, 1, 1),  # no compression
        (262, 3, 1, 2),  # RGB
        (273, 4, strips, table),
        (277, 3, 1, 3),
        (278, 4, 1, 1),  # rows per strip
        (279, 4, strips, table + len(offsets)),
    ]
    entries = b"".join(struct.pack("<HHII", *tag) for tag in tags)
    directory = struct.pack("<H", len(tags)) + entries + struct.pack("<I", 0)
    header = b"II*\x00" + struct.pack("<I", ifd)
    pixels = b"\x80" * width * 3
    return header + pixels + offsets + counts + directory + struct.pack("<3H", 8, 8, 8)


def test_a_tiff_of_a_million_strips_decodes_without_an_object_for_each(tmp_path: Path) -> None:
    path = tmp_path / "strips.tif"
    path.write_bytes(_tiff_of_strips(8, 1_000_000))  # 8 MB
    # Pillow's own reader took 30 bytes a pixel (and 11 s) for the objects of its strips.
    assert _peak_of_a_decode(path) / 8_000_000 < 8


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "packbits"])
@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "F", "I;16"])
def test_a_tiff_decodes_to_its_pixels_through_libtiff(mode: str, compression: str | None) -> None:
    rng = np.random.default_rng(5)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (37, 53), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).convert(mode)
    data = encode(image, "TIFF", compression=compression)
    assert Image.open(io.BytesIO(data)).tile[0].codec_name == "libtiff"
    np.testing.assert_array_equal(np.asarray(decode_image(data, LIMIT)), np.asarray(to_rgb(image)))


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    pixels = np.full((8, 8), 32768, dtype=np.uint16)  # mid-grey in 16 bits
    decoded = decode_image(encode(Image.fromarray(pixels), "PNG"), LIMIT)
    assert decoded.getpixel((0, 0))[0] in range(125, 131)


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(image, "JPEG", exif=exif), LIMIT)
    assert decoded.size == (10, 30)


@pytest.mark.parametrize(
    "data", [b"", b"hello", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, b"\xff\xd8\xff" + b"\x00" * 50]
)
def test_non_images_are_invalid(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        decode_image(data, LIMIT)


def test_a_truncated_jpeg_is_invalid() -> None:
    rng = np.random.default_rng(0)
    data = encode(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(InvalidImage):
        decode_image(data[: len(data) // 3], LIMIT)


@pytest.mark.parametrize(("width", "height"), [(5000, 5000), (30000, 30000)])
def test_pixel_bombs_are_refused_before_decoding(width: int, height: int) -> None:
    with pytest.raises(ImageTooLarge):
        decode_image(png_header_only(width, height), LIMIT)


def test_a_progressive_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    # 2,000 scans of a few bytes each: decoded, this image takes seconds, and 40 MP a minute.
    bomb = progressive_jpeg(noise(1000, 1000), extra_scans=2000)
    with pytest.raises(ImageTooComplex) as refused:
        decode_image(bomb, LIMIT)
    assert refused.value.details == {"max_scans": LIMIT.max_jpeg_scans}


def test_a_progressive_jpeg_up_to_the_scan_limit_decodes() -> None:
    limits = ImageLimits(max_pixels=LIMIT.max_pixels, min_side=1, max_jpeg_scans=12)
    assert decode_image(progressive_jpeg(noise(64, 48), extra_scans=2), limits).size == (64, 48)
    with pytest.raises(ImageTooComplex):
        decode_image(progressive_jpeg(noise(64, 48), extra_scans=3), limits)


def test_a_bmp_that_only_a_decoder_in_python_reads_is_refused() -> None:
    """Pillow decodes RLE-compressed BMPs in Python, holding the interpreter: a 16 MB one took
    4.5 s, and every other request of the server was 12 times slower meanwhile."""
    with pytest.raises(UnsupportedImageFormat) as refused:
        decode_image(rle_bmp(64, 48), LIMIT)
    assert refused.value.details["compression"] == ["bmp_rle"]
    assert decode_image(encode(noise(64, 48, "P"), "BMP"), LIMIT).size == (64, 48)  # not RLE


def test_short_side_crop_keeps_the_centre() -> None:
    spec = Preprocess(size=224, resize=Resize.SHORT_SIDE_CROP, resize_size=256)
    out = resize_for(Image.new("RGB", (512, 300)), spec)
    assert out.size == (224, 224)


def test_stretch_resizes_the_whole_image_to_the_square() -> None:
    image = Image.new("RGB", (400, 100), (255, 0, 0))
    image.paste((0, 0, 255), (300, 0, 400, 100))
    out = resize_for(image, Preprocess(size=40, resize=Resize.STRETCH, interpolation="nearest"))
    assert out.size == (40, 40)
    assert out.getpixel((39, 20)) == (0, 0, 255)  # the blue right quarter survives
    assert out.getpixel((0, 20)) == (255, 0, 0)


def test_tensor_layout_and_normalisation() -> None:
    image = Image.new("RGB", (8, 8), (255, 127, 0))
    lite = Preprocess(size=8, resize_size=8, mean=(127, 127, 127), std=(128, 128, 128))
    chw = to_tensor(image, lite)
    assert chw.shape == (3, 8, 8)
    assert chw.dtype == np.float32
    assert chw[:, 0, 0] == pytest.approx([1.0, 0.0, -127 / 128])
    hub = Preprocess(size=8, layout=Layout.NHWC, resize=Resize.STRETCH, scale=1 / 255)
    hwc = to_tensor(image, hub)
    assert hwc.shape == (8, 8, 3)
    assert hwc[0, 0] == pytest.approx([1.0, 127 / 255, 0.0])


@pytest.mark.parametrize("layout", [Layout.NCHW, Layout.NHWC])
def test_the_tensor_holds_the_formulas_values_bit_for_bit(layout: Layout) -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    spec = Preprocess(
        size=24,
        resize=Resize.STRETCH,
        layout=layout,
        scale=1 / 255,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    pixels = np.asarray(resize_for(image, spec), dtype=np.float32)
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    expected = (pixels * np.float32(spec.scale) - mean) * (1.0 / std)
    if layout is Layout.NCHW:
        expected = expected.transpose(2, 0, 1)
    tensor = to_tensor(image, spec)
    assert tensor.dtype == np.float32
    assert tensor.flags.c_contiguous
    assert np.array_equal(tensor, expected)


@pytest.mark.parametrize("size", [(600, 400), (401, 999), (256, 256), (1200, 257), (300, 2000)])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_the_centre_crop_resamples_the_same_pixels_as_resize_then_crop(
    size: tuple[int, int], interpolation: str
) -> None:
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    spec = Preprocess(size=224, resize_size=256, interpolation=interpolation)
    method = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    width, height = size
    scale = 256 / min(width, height)
    new_w, new_h = max(256, round(width * scale)), max(256, round(height * scale))
    left, top = (new_w - 224) // 2, (new_h - 224) // 2
    expected = image.resize((new_w, new_h), method).crop((left, top, left + 224, top + 224))
    got = resize_for(image, spec)
    diff = np.abs(np.asarray(got, dtype=np.int16) - np.asarray(expected, dtype=np.int16))
    assert diff.max() <= 1  # float rounding of the region's corners, at most
