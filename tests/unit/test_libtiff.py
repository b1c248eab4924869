from __future__ import annotations

import _ctypes
import logging
import re
from pathlib import Path

import pytest

from tandem.errors import InvalidImage
from tandem.runtime.imaging import decode_image
from tandem.runtime.libtiff import route_to_logging
from tests.support import cut_tiff

pytestmark = pytest.mark.filterwarnings("ignore:Truncated File Read:UserWarning")  # Pillow's


def test_libtiff_reports_a_broken_tiff_through_logging(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """libtiff wrote its errors to stderr itself, raw, one line of the client's making per
    request; amid JSON logs they were no JSON."""
    [library] = route_to_logging()
    assert "libtiff" in Path(library).name
    caplog.set_level(logging.DEBUG, "tandem.libtiff")
    with pytest.raises(InvalidImage):
        decode_image(cut_tiff())
    assert "TIFF" not in capfd.readouterr().err
    messages = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "tandem.libtiff"]
    assert (logging.INFO, "TIFFFetchDirectory: Can not read TIFF directory") in messages
    # Formatted by the C library from libtiff's arguments: the offset is a number.
    assert any(re.fullmatch(r"TIFFReadDirectory: .* offset \d+", m) for _, m in messages)


def test_routing_twice_is_harmless(caplog: pytest.LogCaptureFixture) -> None:
    """Each command's start-up routes once; a second call (a test, an embedding program)
    keeps the handlers libtiff holds alive, and each message still comes once."""
    assert route_to_logging() == route_to_logging()
    caplog.set_level(logging.INFO, "tandem.libtiff")
    with pytest.raises(InvalidImage):
        decode_image(cut_tiff())
    directory = [r for r in caplog.records if "Can not read TIFF directory" in r.getMessage()]
    assert len(directory) == 1


def test_without_proc_there_is_nothing_to_route(tmp_path: Path) -> None:
    assert route_to_logging(tmp_path / "absent") == []
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libtiffxx-other/libc.so.6\n")
    assert route_to_logging(maps) == []


def test_a_library_without_handlers_is_passed_over(tmp_path: Path) -> None:
    """libtiffxx, libtiff's C++ interface, matches the name and has no handlers to set."""
    other = tmp_path / "libtiffxx.so.6"
    other.symlink_to(_ctypes.__file__)  # a shared library, without libtiff's symbols
    maps = tmp_path / "maps"
    maps.write_text(f"7f00-7f01 r-xp 00000000 08:01 1 {other}\n")
    assert route_to_logging(maps) == []
