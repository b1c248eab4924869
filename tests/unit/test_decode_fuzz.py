"""Fuzzing the image-decoding path with mutated real images of each format (hypothesis).

Every input gives an RGB image or one of our typed errors, never anything else, and decoding
stays within its pixel budget, so memory stays bounded whatever the bytes claim.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from skimage import data as photos

from tandem.errors import TandemError
from tandem.runtime.imaging import ImageLimits, decode_image
from tests.support import encode, progressive_jpeg

LIMITS = ImageLimits(max_pixels=2_000_000, min_side=8)
SEEDS = [
    encode(photos.chelsea()[:120, :160], "JPEG", quality=80),
    encode(photos.coffee()[:100, :100], "PNG"),
    encode(photos.astronaut()[:64, :64], "GIF"),
    encode(photos.rocket()[:64, :64], "WEBP"),
    encode(photos.camera()[:64, :48], "TIFF"),
    encode(photos.astronaut()[:40, :40], "BMP"),
    encode(photos.coffee()[:48, :64], "TIFF", compression="tiff_lzw"),
    progressive_jpeg(Image.fromarray(photos.chelsea()[:64, :96]), extra_scans=3),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "overwrite-header"]))
        at = draw(st.integers(0, len(data) - 1)) if data else 0
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 512))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:  # dimension fields live in the first bytes of every format
            position = draw(st.integers(0, min(40, len(data))))
            data[position : position + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


# Mutated files make Pillow warn (corrupt EXIF, a truncated read): what they are for. The
# service logs such warnings (test_logs); here they were dozens of lines of pytest's summary.
@pytest.mark.filterwarnings("ignore::UserWarning:PIL")
@given(mutated())
@settings(
    max_examples=600, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
def test_mutated_images_decode_or_fail_typed(data: bytes) -> None:
    outcome: Image.Image | TandemError
    try:
        outcome = decode_image(data, LIMITS)
    except TandemError as error:
        outcome = error
    if isinstance(outcome, TandemError):
        assert 400 <= outcome.status < 500
        return
    image = outcome
    assert image.mode == "RGB"
    assert image.width * image.height <= LIMITS.max_pixels


def test_fuzzing_keeps_memory_bounded() -> None:
    # Run the fuzzer alone in a fresh process and read that process's own peak RSS (VmHWM:
    # getrusage's ru_maxrss would carry over the parent's peak through fork and exec). Decoded
    # images are capped at 2 Mpx (6 MB of RGB); a decoder that allocated for what a mutated
    # header claims (up to 4 billion pixels) would blow far past the bound.
    code = (
        "import re, sys, pytest;"
        f"code = pytest.main(['-q', '-p', 'no:cacheprovider', '{__file__}::"
        "test_mutated_images_decode_or_fail_typed']);"
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read());"
        "print('PEAK_MB', int(hwm[1]) // 1024);"
        "sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-2000:]
    peak_mb = int(result.stdout.rsplit("PEAK_MB", 1)[1].split()[0])
    assert peak_mb < 400, peak_mb


def test_atheris_finds_no_crash_within_its_budget(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, seed in enumerate(SEEDS):
        (corpus / f"seed{index}").write_bytes(seed)
    harness = Path(__file__).parents[1] / "fuzz" / "decode_atheris.py"
    result = subprocess.run(
        [
            sys.executable,
            str(harness),
            str(corpus),
            "-runs=3000",
            "-seed=1",
            "-rss_limit_mb=0",  # the harness bounds its own peak: see PEAK_LIMIT_MB there
            "-max_len=65536",
            "-timeout=20",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # libFuzzer may end a few runs past -runs (CI once saw 3008): the whole budget must run.
    done = re.search(r"Done (\d+) runs", result.stderr)
    assert done is not None, result.stderr[-3000:]
    assert int(done[1]) >= 3000
