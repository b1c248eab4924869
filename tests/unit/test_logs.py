from __future__ import annotations

import json
import logging
import sys
import warnings

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from tandem.logs import ContextFilter, JsonFormatter, TextFormatter, configure_logging, counted


def _record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("tandem.access", logging.INFO, __file__, 1, message, args, exc_info)


def test_a_text_line_escapes_what_a_client_put_in_a_path() -> None:
    """`/health%0A...` wrote a second line of the client's making into the log."""
    path = "/health\n2026-11-26 00:00:00,000 ERROR tandem.api: forged\x1b[31m"
    line = TextFormatter().format(_record('"GET %s" %d', path, 404))
    assert "\n" not in line
    assert "\x1b" not in line
    assert line.endswith(
        '"GET /health\\n2026-11-26 00:00:00,000 ERROR tandem.api: forged\\x1b[31m" 404'
    )


def test_a_traceback_still_follows_its_line() -> None:
    text = TextFormatter().format(_record("failed", exc=True))
    first, *rest = text.splitlines()
    assert first.endswith("tandem.access: failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: boom"


def test_a_json_line_keeps_the_message_as_sent() -> None:
    line = JsonFormatter().format(_record('"GET %s"', "/a\nb"))
    assert "\n" not in line
    assert json.loads(line)["message"] == '"GET /a\nb"'


@pytest.mark.usefixtures("restored_logging")
def test_warnings_come_out_in_the_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    """Pillow's warning on a client's corrupt EXIF was printed raw, two lines amid JSON."""
    # Another test's configure_logging leaves logging believing it captures warnings, while
    # pytest has put its own showwarning back: capturing again would then do nothing.
    logging.captureWarnings(False)
    configure_logging("info", "json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("Corrupt EXIF data.", UserWarning, stacklevel=1)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "warning"
    assert "UserWarning: Corrupt EXIF data." in record["message"]


def _filtered_json(message: str) -> dict[str, object]:
    record = _record(message)
    ContextFilter().filter(record)
    line: dict[str, object] = json.loads(JsonFormatter().format(record))
    return line


def test_a_json_line_logged_within_a_recording_span_names_it() -> None:
    """Where traces are recorded, a log line finds its trace, and a trace its lines."""
    with TracerProvider().get_tracer("test").start_as_current_span("request") as span:
        traced = _filtered_json("served")
    with TracerProvider(sampler=ALWAYS_OFF).get_tracer("off").start_as_current_span("off"):
        unsampled = _filtered_json("served")
    plain = _filtered_json("served")
    context = span.get_span_context()
    ids = (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert (traced["trace_id"], traced["span_id"]) == ids
    for line in (unsampled, plain):
        assert "trace_id" not in line
        assert "span_id" not in line


@pytest.mark.parametrize(("count", "said"), [(0, "0 jobs"), (1, "1 job"), (4, "4 jobs")])
def test_a_count_in_a_log_line_agrees_with_its_noun(count: int, said: str) -> None:
    assert counted(count, "job") == said
