"""Counting a file's parts before Pillow walks them, and refusing files of too many."""

from __future__ import annotations

import pytest
from PIL import Image

from tandem.errors import ImageTooComplex
from tandem.runtime.containers import PNG_SIGNATURE, container_parts, jpeg_scans
from tandem.runtime.imaging import ImageLimits, decode_image
from tests.support import encode, noise, png_chunk, progressive_jpeg

LIMIT = ImageLimits(max_pixels=10_000_000, min_side=1)
MANY = LIMIT.max_parts + 1000


@pytest.mark.parametrize(("mode", "scans"), [("RGB", 10), ("L", 6), ("CMYK", 18)])
def test_the_scans_of_a_progressive_jpeg_are_counted(mode: str, scans: int) -> None:
    # libjpeg's progression for each kind of image, as Pillow writes it.
    assert jpeg_scans(progressive_jpeg(noise(64, 48, mode)), stop_after=1000) == scans
    assert jpeg_scans(progressive_jpeg(noise(64, 48, mode), 7), stop_after=1000) == scans + 7
    assert jpeg_scans(encode(noise(64, 48, mode), "JPEG"), stop_after=1000) == 1


def test_marker_bytes_inside_a_segment_or_after_the_image_are_not_scans() -> None:
    comment = b"\xff\xda" * 300
    data = progressive_jpeg(noise(64, 48), comment=comment, exif=comment)
    assert jpeg_scans(data + data, stop_after=1000) == 10
    assert decode_image(data, LIMIT).size == (64, 48)


def test_the_count_stops_after_the_limit_and_at_a_malformed_stream() -> None:
    data = progressive_jpeg(noise(64, 48), extra_scans=50)
    assert jpeg_scans(data, stop_after=20) == 21
    assert jpeg_scans(data[: len(data) // 2], stop_after=1000) < 60
    assert jpeg_scans(b"\xff\xd8\xff\xda\x00\x01" + data[2:], stop_after=1000) == 1  # bad length
    assert jpeg_scans(b"\xff\xd8" + b"\x00" * 20, stop_after=1000) == 0


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _jpeg_with(before_tables: bytes) -> bytes:
    """A JPEG with `before_tables` after its first segment (APP0)."""
    data = encode(Image.new("RGB", (64, 48), "teal"), "JPEG")
    at = 4 + int.from_bytes(data[4:6], "big")
    return data[:at] + before_tables + data[at:]


def _png_with(ancillary: int = 0, idat_size: int | None = None, side: int = 64) -> bytes:
    """A PNG with `ancillary` empty chunks of an unknown kind after its header, and its image
    data cut into chunks of `idat_size` bytes."""
    chunks = _png_chunks(encode(noise(side, side), "PNG"))
    data = b"".join(body for kind, body in chunks if kind == b"IDAT")
    size = idat_size or len(data)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", chunks[0][1])
        + png_chunk(b"teSt") * ancillary
        + b"".join(png_chunk(b"IDAT", data[at : at + size]) for at in range(0, len(data), size))
        + png_chunk(b"IEND")
    )


def _gif_with_comment(sub_blocks: int) -> bytes:
    """A GIF with a comment of `sub_blocks` one-byte sub-blocks before its image."""
    data = encode(Image.new("P", (64, 48), 3), "GIF")
    flags = data[10]
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return data[:at] + b"!\xfe" + b"\x01A" * sub_blocks + b"\x00" + data[at:]


def test_files_as_encoders_write_them_have_few_parts() -> None:
    exif = Image.Exif()
    exif[0x010E] = "a description"
    jpeg = encode(noise(640, 480), "JPEG", exif=exif, comment=b"hello")
    png = encode(noise(640, 480), "PNG")
    counts = {
        "JPEG": container_parts(jpeg, stop_after=MANY),
        "PNG": container_parts(png, stop_after=MANY),
        "GIF": container_parts(_gif_with_comment(3), stop_after=MANY),
    }
    # APP0, APP1, COM, 2 DQT, SOF, 4 DHT and SOS; IHDR, 15 IDAT of 64 KB and IEND; a
    # comment's 3 sub-blocks and its terminator.
    assert {name: parts.count if parts else None for name, parts in counts.items()} == {
        "JPEG": 11,
        "PNG": 17,
        "GIF": 4,
    }
    for fmt in ("WEBP", "TIFF", "BMP"):
        assert container_parts(encode(noise(64, 48), fmt), stop_after=MANY) is None


def _count(data: bytes, stop_after: int = MANY) -> int:
    parts = container_parts(data, stop_after)
    assert parts is not None
    return parts.count


def test_every_part_counts_and_the_count_stops_past_the_limit() -> None:
    plain = _count(_jpeg_with(b""))
    assert _count(_jpeg_with(b"\xff\xfe\x00\x02" * 50)) == plain + 50  # empty comments
    assert _count(_jpeg_with(b"\xff" * 50)) == plain + 50  # fill bytes
    assert _count(_jpeg_with(b"\x00" * 50)) == plain + 50  # stray bytes
    png = _png_with(ancillary=50, idat_size=100)
    assert _count(png) == len(_png_chunks(png)) > 50 + 3
    assert _count(_png_with(ancillary=500), stop_after=100) == 101
    assert _count(_gif_with_comment(500), stop_after=100) == 101


@pytest.mark.parametrize(
    "data",
    [
        _jpeg_with(b"\xff\xfe\x00\x02" * MANY),  # empty comments
        _jpeg_with(b"\xff\xe5\x00\x02" * MANY),  # empty APP5 segments, each kept in a list
        _jpeg_with(b"\xff" * MANY),  # fill bytes
        _jpeg_with(b"\x00" * MANY),  # stray bytes
        _png_with(ancillary=MANY),
        _png_with(idat_size=1, side=160),  # 77 KB of image data in one-byte chunks
        _gif_with_comment(MANY),
    ],
    ids=["jpeg-comments", "jpeg-app", "jpeg-fill", "jpeg-stray", "png", "png-idat", "gif"],
)
def test_a_file_of_too_many_parts_is_refused_before_pillow_walks_them(data: bytes) -> None:
    with pytest.raises(ImageTooComplex) as refused:
        decode_image(data, LIMIT)
    assert refused.value.details == {"max_parts": LIMIT.max_parts}


def test_a_file_up_to_the_limit_of_parts_decodes() -> None:
    limits = ImageLimits(max_pixels=LIMIT.max_pixels, min_side=1, max_parts=100)
    assert decode_image(_gif_with_comment(99), limits).size == (64, 48)  # and its terminator
    with pytest.raises(ImageTooComplex):
        decode_image(_gif_with_comment(100), limits)
