from __future__ import annotations

from dataclasses import replace

import pytest

from tandem.errors import JobNotFound
from tandem.jobs.records import (
    PAYLOAD_VERSION,
    TERMINAL_STATUSES,
    Delivery,
    DeliveryState,
    Job,
    JobSpec,
    JobStatus,
    Meta,
    dump_delivery,
    dump_meta,
    dump_prediction,
    load_delivery,
    load_meta,
    load_prediction,
    new_job_id,
    parse_job_id,
    request_fingerprint,
)
from tandem.predictions import Prediction, Scored


def test_job_ids_carry_128_random_bits() -> None:
    ids = {new_job_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert all(parse_job_id(i) == i for i in list(ids)[:10])


@pytest.mark.parametrize("bad", ["", "6195b8", "G" * 32, "A" * 32, "0" * 31, "0" * 33, "a b"])
def test_malformed_ids_name_no_job(bad: str) -> None:
    with pytest.raises(JobNotFound):
        parse_job_id(bad)


def test_terminal_statuses() -> None:
    assert {s for s in JobStatus if s.terminal} == TERMINAL_STATUSES
    assert {"done", "failed", "cancelled"} == TERMINAL_STATUSES


def test_payloads_are_versioned_json_that_round_trips() -> None:
    prediction = Prediction("m", (Scored(1, "a", 0.5), Scored(2, "b", 0.25)), 3.0)
    spec = JobSpec(
        id=new_job_id(),
        image=b"x",
        fast=prediction,
        request_id="r",
        callback_url="http://h/",
        fingerprint="f",
        trace={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )
    assert load_meta(dump_meta(spec)) == Meta(prediction, "r", "http://h/", "f", spec.trace)
    # A record stored before fingerprints, or traces, reads as having none.
    assert load_meta('{"v":1,"fast":null}').fingerprint is None
    assert load_meta('{"v":1,"fast":null}').trace is None
    assert '"trace"' not in dump_meta(replace(spec, trace=None))
    assert load_prediction(dump_prediction(prediction)) == prediction
    delivery = Delivery(DeliveryState.FAILED, 3, "HTTP 500", 12.5)
    assert load_delivery(dump_delivery(delivery)) == delivery
    for text in (dump_meta(spec), dump_prediction(prediction), dump_delivery(delivery)):
        assert f'"v":{PAYLOAD_VERSION}' in text


@pytest.mark.parametrize("stored", ['"00-ab"', "[1]", '{"traceparent": 7}', "{}"])
def test_a_stored_trace_that_is_not_a_map_of_strings_is_dropped(stored: str) -> None:
    assert load_meta(f'{{"v":1,"trace":{stored}}}').trace is None


def test_an_unknown_payload_version_is_refused() -> None:
    with pytest.raises(ValueError, match="version"):
        load_meta('{"v": 99}')


def _job(fast: Prediction | None, result: Prediction | None, status: JobStatus) -> Job:
    return Job(
        id=new_job_id(), status=status, created_at=0.0, updated_at=0.0, fast=fast, result=result
    )


def test_the_final_answer_is_the_best_known_one() -> None:
    fast = Prediction("fast", (Scored(282, "tiger cat", 0.4),), 1.0)
    same = Prediction("accurate", (Scored(282, "tiger cat", 0.7),), 2.0)
    other = Prediction("accurate", (Scored(285, "Egyptian cat", 0.6),), 2.0)
    waiting = _job(fast, None, JobStatus.QUEUED)
    assert (waiting.final, waiting.changed) == (fast, False)
    agreed = _job(fast, same, JobStatus.DONE)
    assert (agreed.final, agreed.changed) == (same, False)
    disagreed = _job(fast, other, JobStatus.DONE)
    assert (disagreed.final, disagreed.changed) == (other, True)
    assert _job(None, None, JobStatus.QUEUED).final is None


def test_a_request_s_fingerprint_covers_its_image_and_its_callback() -> None:
    base = request_fingerprint(b"image", None)
    assert request_fingerprint(b"image", None) == base
    assert request_fingerprint(b"image", "") == base  # no callback either way
    assert request_fingerprint(b"other", None) != base
    assert request_fingerprint(b"image", "https://hooks.example/x") != base
    # The separator keeps the image's end from passing for the callback's start.
    assert request_fingerprint(b"imageh", "ttps://x") != request_fingerprint(b"image", "https://x")


def test_an_idempotency_key_is_filed_within_its_scope() -> None:
    unscoped = JobSpec(new_job_id(), b"", idempotency_key="order-1")
    assert unscoped.idempotency_slot == "order-1"
    scoped = JobSpec(new_job_id(), b"", idempotency_key="order-1", owner="ab12")
    assert scoped.idempotency_slot == "ab12 order-1"  # a key holds no space: no collision
    assert JobSpec(new_job_id(), b"", owner="ab12").idempotency_slot is None
