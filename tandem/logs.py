"""Logging set-up: readable lines for people, or one JSON object per line for machines.

Every line logged while a request is served carries its request id (from a context variable
the API sets), and the worker logs each job with the request id that created it, so
`grep <request id>` shows the whole life of one image across proxy and worker. Where traces
are recorded, a JSON line also carries the ids of the span it was logged in.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from typing import Literal

from opentelemetry import trace

current_request_id: ContextVar[str | None] = ContextVar("tandem_request_id", default=None)

# Attributes a record may carry through `extra=`, copied into JSON lines.
CONTEXT_FIELDS = (
    "request_id",
    "job_id",
    "worker_id",
    "method",
    "path",
    "status",
    "duration_ms",
    "api_key_id",
    "trace_id",
    "span_id",
)
LogFormat = Literal["text", "json"]
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


class ContextFilter(logging.Filter):
    """Fill in `request_id` from the context when the call did not pass one, and the ids of
    the current span where it is sampled (an OpenTelemetry SDK configured): a JSON line then
    names its trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id.get()
        # Sampled, not recording: the access line comes once the response has ended its span.
        context = trace.get_current_span().get_span_context()
        if context.is_valid and context.trace_flags.sampled:
            record.trace_id = f"{context.trace_id:032x}"
            record.span_id = f"{context.span_id:016x}"
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """One line a record (but for a traceback after it). Control characters in the message
    are escaped: a path is logged as the client sent it, and `/health%0A...` had written a
    line of the client's making, `%1b[...` a terminal escape."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(_escaped, record.message)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [{request_id}]" if request_id else text


def configure_logging(level: str, fmt: LogFormat) -> None:
    """Route Tandem's and uvicorn's loggers to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Warnings too, such as Pillow's on a client's corrupt EXIF: printed raw, they broke the
    # one JSON object a line. Each still comes once a place, as Python's filters have it.
    logging.captureWarnings(True)


def counted(count: int, noun: str) -> str:
    """`1 job`, `4 jobs`: a count as a log line says it."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
