"""libtiff's messages through Python's logging, not straight to stderr.

Every TIFF is read by libtiff (see imaging), which writes its errors and warnings about a
broken file to stderr itself, a line of the client's making for each such request: amid
`TANDEM_LOG_FORMAT=json` those lines were no JSON, and they carried no request id. libtiff
takes one pair of handlers for the whole process; these format the message with the C
library's `vsnprintf` and log it on `tandem.libtiff`.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tandem.libtiff")

# void (*TIFFErrorHandler)(const char *module, const char *fmt, va_list ap). The va_list
# arrives as a pointer, passed on to vsnprintf as it came: x86-64's is an array, which decays
# to one, and AArch64's a 32-byte struct, which the calling convention passes by reference.
_Handler = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p)
_LIBRARY = re.compile(r"\s(/\S*/libtiff[^/\s]*\.so[^/\s]*)$")
MESSAGE_BYTES = 1024

# ctypes frees a callback that Python no longer references: libtiff would call freed code.
_handlers: dict[str, tuple[object, object]] = {}


def route_to_logging(maps: Path = Path("/proc/self/maps")) -> list[str]:
    """Hand every libtiff this process has loaded (Pillow's, in its wheel) handlers that log:
    errors at info, since the client's file is at fault and its request gets 422, warnings
    at debug. Return the libraries' paths; none where there is no /proc (not Linux)."""
    import PIL.Image  # noqa: F401 (its C module brings libtiff in)

    routed = []
    for path in _loaded(maps):
        if path not in _handlers:
            try:
                _handlers[path] = _install(ctypes.CDLL(path))
            except (OSError, AttributeError) as exc:  # libtiffxx, say: C++, no handlers
                log.debug("%s keeps its own messages: %s", path, exc)
                continue
        routed.append(path)
    return routed


def _loaded(maps: Path) -> list[str]:
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    return sorted({m.group(1) for m in map(_LIBRARY.search, lines) if m})


def _install(library: ctypes.CDLL) -> tuple[object, object]:
    vsnprintf = ctypes.CDLL(None).vsnprintf  # the C library, which Python is linked with
    vsnprintf.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p)
    on_error = _Handler(_logger(logging.INFO, vsnprintf))
    on_warning = _Handler(_logger(logging.DEBUG, vsnprintf))
    for setter, handler in (
        (library.TIFFSetErrorHandler, on_error),
        (library.TIFFSetWarningHandler, on_warning),
    ):
        setter.argtypes, setter.restype = (_Handler,), ctypes.c_void_p
        setter(handler)
    return on_error, on_warning


def _logger(level: int, vsnprintf: Callable[..., int]) -> Callable[..., None]:
    def handle(module: bytes | None, fmt: bytes | None, args: int | None) -> None:
        # An exception here would only be printed, raw, by ctypes: the very thing to avoid.
        try:
            if log.isEnabledFor(level) and fmt is not None:
                message = ctypes.create_string_buffer(MESSAGE_BYTES)
                vsnprintf(message, MESSAGE_BYTES, fmt, args)
                log.log(level, "%s: %s", _text(module), _text(message.value))
        except Exception:
            return

    return handle


def _text(raw: bytes | None) -> str:
    return "" if raw is None else raw.decode("utf-8", "replace")
