"""The client's reading of the wire: event streams and error bodies."""

from __future__ import annotations

import json

import pytest

from tandem.client import EventParser, JobResult
from tandem.errors import JobNotFound, TandemError, UnreadableJob, error_from_wire

JOB_ID = "0" * 32
QUEUED = {"job_id": JOB_ID, "status": "queued", "fast": None, "accurate": None}
UNREADABLE = {
    "error": {
        "code": "unreadable_job",
        "message": "job's stored record cannot be read",
        "request_id": "r-1",
        "details": {"job_id": JOB_ID},
    }
}


def fed(parser: EventParser, *lines: str) -> list[JobResult]:
    return [event for line in lines if (event := parser.feed(line)) is not None]


def test_each_event_is_a_job_state_and_comments_are_skipped() -> None:
    parser = EventParser()
    events = fed(parser, ": keep-alive", "", "event: queued", f"data: {json.dumps(QUEUED)}", "")
    assert [event.status for event in events] == ["queued"]


def test_an_error_event_raises_the_typed_error_with_its_class_status() -> None:
    parser = EventParser()
    fed(parser, "event: queued", f"data: {json.dumps(QUEUED)}", "")
    fed(parser, "event: error", f"data: {json.dumps(UNREADABLE)}")
    with pytest.raises(UnreadableJob) as raised:
        parser.feed("")
    error = raised.value
    assert (error.status, error.request_id, error.details) == (500, "r-1", {"job_id": JOB_ID})


def test_an_http_status_overrides_the_class_status_and_unknown_codes_stay_generic() -> None:
    gone = {"error": {"code": "job_not_found", "message": "no such job", "details": {}}}
    assert isinstance(error_from_wire(404, gone), JobNotFound)
    novel = error_from_wire(418, {"error": {"code": "teapot", "message": "short and stout"}})
    assert type(novel) is TandemError
    assert (novel.status, novel.details) == (418, {"code": "teapot"})
