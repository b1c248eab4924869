"""Counting the parts of an image file's container before a decoder walks them.

Pillow reads a file's container in Python, part by part, and hands only the pixels to C:
each JPEG segment and stray byte before the first scan, each PNG chunk, each GIF block before
the first image costs it microseconds, and some are kept in memory. A file of tiny parts thus
costs far more than its pixels: 8 MB of empty JPEG segments before a 64x64 image took 4.5 s
and 314 MB to open. These walks do less per part, and stop once past a limit.

A JPEG's scans are counted here too: libjpeg, in C, passes over the whole image for each.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Bytes before a marker (stray, or 0xFF fill), then the marker. Pillow steps over each of
# those bytes in turn.
_MARKER = re.compile(rb"([^\xff]*)(\xff+)([^\xff])", re.DOTALL)
# In a scan's coded data 0xFF is followed by a stuffed 0x00, a restart marker or more 0xFF
# fill; anything else is the next marker.
_AFTER_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_NO_LENGTH = frozenset({0x00, 0x01, *range(0xD0, 0xD9)})  # stuffing, TEM, RSTn, SOI
_SOS, _EOI = 0xDA, 0xD9


@dataclass(frozen=True, slots=True)
class Parts:
    """How many parts a file has (counted up to the limit and one more), and what they are."""

    format: str
    what: str
    count: int


def container_parts(data: bytes, stop_after: int) -> Parts | None:
    """The parts Pillow walks one by one in a JPEG, PNG or GIF; None for other formats."""
    if data.startswith(b"\xff\xd8\xff"):
        count = _jpeg_header_parts(data, stop_after)
        return Parts("JPEG", "segments and stray bytes before its first scan", count)
    if data.startswith(PNG_SIGNATURE):
        return Parts("PNG", "chunks", _png_chunks(data, stop_after))
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return Parts("GIF", "blocks before its first image", _gif_blocks(data, stop_after))
    return None


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """The scans of the first image in a JPEG, counted up to `stop_after + 1`."""
    scans = 0
    for marker, _ in _jpeg_markers(data):
        scans += marker == _SOS
        if scans > stop_after:
            break
    return scans


def _jpeg_header_parts(data: bytes, stop_after: int) -> int:
    parts = 0
    for marker, stray in _jpeg_markers(data):
        parts += 1 + stray
        if marker == _SOS or parts > stop_after:
            break
    return parts


def _jpeg_markers(data: bytes) -> Iterator[tuple[int, int]]:
    """Each marker of the first image in a JPEG, with the bytes before it that no segment
    holds. A segment is skipped by its length, a scan's coded data to the next marker; the
    walk ends at EOI or where the stream breaks, and the decoder then judges it."""
    pos = 2  # past SOI
    while found := _MARKER.match(data, pos):
        marker, pos = found[3][0], found.end()
        yield marker, len(found[1]) + len(found[2]) - 1
        if marker == _EOI:
            return
        if marker in _NO_LENGTH:
            continue
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            return
        pos += length
        if marker == _SOS:
            after = _AFTER_SCAN.search(data, pos)
            if after is None:
                return
            pos = after.start()


def _png_chunks(data: bytes, stop_after: int) -> int:
    chunks, pos = 0, len(PNG_SIGNATURE)
    while chunks <= stop_after and pos + 8 <= len(data):
        chunks += 1
        if data[pos + 4 : pos + 8] == b"IEND":
            break
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC
    return chunks


def _gif_blocks(data: bytes, stop_after: int) -> int:
    """Extensions' sub-blocks before the first image descriptor; the image's own data is read
    by Pillow's C decoder."""
    flags = data[10] if len(data) > 10 else 0
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # past the global palette
    blocks = 0
    while blocks <= stop_after and data[pos : pos + 1] == b"!":
        pos += 2  # introducer and label
        size = -1
        while size != 0 and blocks <= stop_after and pos < len(data):
            size = data[pos]
            blocks += 1
            pos += 1 + size
    return blocks
