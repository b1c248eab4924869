"""Pushed results (SSE), long-polling and /metrics on a real `tandem serve` over loopback,
on the `working` and `idle` servers of conftest.py."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tandem.client import Client
from tandem.errors import UnreadableJob
from tests.support import (
    ServerProcess,
    encode,
    metric,
    overwrite_meta,
    rss_kib,
    server_sent_events,
    solid,
    wait_for_job,
)

pytestmark = pytest.mark.slow

IMAGE = encode(solid((200, 30, 30)), "PNG")
RAW = {"Content-Type": "image/png"}


def submit(client: httpx.Client) -> str:
    response = client.post("/predict", content=IMAGE, headers=RAW)
    assert response.status_code == 200, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def test_events_stream_each_state_then_the_result_then_close(working: ServerProcess) -> None:
    with working.client() as client:
        job_id = submit(client)
        with client.stream("GET", f"/job/{job_id}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = list(server_sent_events(response))  # ends when the server closes it
    names = [name for name, _ in events]
    assert names[-1] == "done"
    assert set(names) <= {"queued", "running", "done"}
    assert len(names) == len(set(names))  # each state once
    last = json.loads(events[-1][1])
    assert last["job_id"] == job_id
    assert last["status"] == "done"
    assert last["accurate"]["model"] == "tiny_accurate"
    assert last["final"]["source"] == "accurate"


def test_events_of_a_finished_job_are_its_final_state(working: ServerProcess) -> None:
    with working.client() as client:
        job_id = submit(client)
        assert client.get(f"/job/{job_id}", params={"wait": 20}).json()["status"] == "done"
        with client.stream("GET", f"/job/{job_id}/events") as response:
            events = list(server_sent_events(response))
    assert [name for name, _ in events] == ["done"]


@pytest.mark.parametrize("job_id", ["0" * 32, "not-an-id"])
def test_events_and_long_poll_of_an_unknown_job_are_404(
    working: ServerProcess, job_id: str
) -> None:
    with working.client() as client:
        for response in (
            client.get(f"/job/{job_id}/events"),
            client.get(f"/job/{job_id}", params={"wait": 5}),
        ):
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "job_not_found"


def test_long_poll_answers_when_the_job_is_done(working: ServerProcess) -> None:
    with working.client() as client:
        job = client.get(f"/job/{submit(client)}", params={"wait": 20}).json()
    assert job["status"] == "done"


def test_long_poll_of_a_waiting_job_returns_it_after_the_wait(idle: ServerProcess) -> None:
    with idle.client() as client:
        job_id = submit(client)
        started = time.monotonic()
        job = client.get(f"/job/{job_id}", params={"wait": 0.5}).json()
        assert time.monotonic() - started >= 0.5
        assert job["status"] == "queued"


@pytest.mark.parametrize("wait", ["-1", "61", "soon"])
def test_long_poll_wait_is_bounded(idle: ServerProcess, wait: str) -> None:
    with idle.client() as client:
        response = client.get(f"/job/{submit(client)}", params={"wait": wait})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


def stream_lines(url: str, job_id: str) -> list[str]:
    """Every line of the job's event stream, read to its end."""
    with (
        httpx.Client(base_url=url, timeout=30) as own,
        own.stream("GET", f"/job/{job_id}/events") as response,
    ):
        return list(response.iter_lines())


def event_names(lines: list[str]) -> list[str]:
    return [line[6:].strip() for line in lines if line.startswith("event:")]


def test_an_event_reaches_a_watcher_of_a_cancelled_job(idle: ServerProcess) -> None:
    with idle.client() as client, ThreadPoolExecutor(1) as pool:
        job_id = submit(client)
        watching = pool.submit(stream_lines, idle.url, job_id)
        time.sleep(0.3)
        assert client.delete(f"/job/{job_id}").status_code == 200
        assert event_names(watching.result(timeout=20)) == ["queued", "cancelled"]


def test_a_stream_ends_with_a_typed_error_event_when_its_job_turns_unreadable(
    idle: ServerProcess,
) -> None:
    """A newer Tandem rewrote the record while it was watched: the stream was cut, and the
    client saw only a broken connection."""
    db = Path(idle.env["TANDEM_DATA_DIR"]) / "tandem.db"
    with idle.client() as client:
        job_id = submit(client)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (meta,) = conn.execute("SELECT meta FROM jobs WHERE id = ?", (job_id,)).fetchone()
    try:
        with Client(idle.url) as tandem:
            events = tandem.events(job_id)
            assert next(events).status == "queued"
            overwrite_meta(db, '{"v": 2}', job_id)  # seen by the server's re-read of the file
            with pytest.raises(UnreadableJob) as raised:
                next(events)
    finally:
        overwrite_meta(db, meta, job_id)  # the server is shared with other tests
    assert raised.value.details == {"job_id": job_id}
    assert raised.value.status == 500
    assert raised.value.request_id is not None


def test_a_stream_sends_no_comment_between_states_until_it_has_been_quiet_a_while(
    idle: ServerProcess,
) -> None:
    """SQLite woke each watch every 0.5 s (other processes may write the file), and each
    wake-up sent a keep-alive: twice a second per stream, where 15 s was meant."""
    with idle.client() as client, ThreadPoolExecutor(1) as pool:
        job_id = submit(client)
        streaming = pool.submit(stream_lines, idle.url, job_id)
        time.sleep(2.0)  # four wake-ups
        assert client.delete(f"/job/{job_id}").status_code == 200
        lines = streaming.result(timeout=20)
    assert [line for line in lines if line.startswith((":", "event:"))] == [
        "event: queued",
        "event: cancelled",
    ]


def test_shutdown_ends_streams_and_long_polls_at_once_not_after_the_grace_period(
    own_idle: ServerProcess,
) -> None:
    """uvicorn's graceful wait (30 s) was spent holding them open, then cancelled them with
    a traceback, and the clients saw a cut connection."""
    with own_idle.client() as client:
        job_id = submit(client)

    def long_poll() -> httpx.Response:
        with httpx.Client(base_url=own_idle.url, timeout=30) as own:
            return own.get(f"/job/{job_id}", params={"wait": "30"})

    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(stream_lines, own_idle.url, job_id)
        polled = pool.submit(long_poll)
        time.sleep(1.0)  # both are waiting on the job
        assert own_idle.process is not None
        started = time.monotonic()
        own_idle.process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught.
        assert own_idle.wait_exit(timeout=20) in (0, -signal.SIGTERM)
        took = time.monotonic() - started
        assert event_names(streamed.result(timeout=5)) == ["queued"]  # ended, not cut
        answer = polled.result(timeout=5)
    assert answer.status_code == 200
    assert answer.json()["status"] == "queued"
    assert took < 10, f"shutdown took {took:.1f} s"
    assert "Traceback" not in own_idle.log()
    assert "timeout graceful shutdown exceeded" not in own_idle.log()


def _watchers_and_tasks(client: httpx.Client) -> tuple[float, float]:
    text = client.get("/metrics").text
    return metric(text, "tandem_job_watchers"), metric(text, "tandem_asyncio_tasks")


def test_clients_that_drop_their_streams_leave_nothing_behind(idle: ServerProcess) -> None:
    assert idle.process is not None
    with idle.client() as client:
        job_id = submit(client)
        _, tasks_before = _watchers_and_tasks(client)
        rss_before = rss_kib(idle.process.pid)

        def connect_and_drop(_: int) -> None:
            with (
                httpx.Client(base_url=idle.url, timeout=10) as own,
                own.stream("GET", f"/job/{job_id}/events") as response,
            ):
                assert next(server_sent_events(response))[0] == "queued"
            # leaving the block closes the connection mid-stream

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(connect_and_drop, range(400)))
        deadline = time.monotonic() + 10
        while (state := _watchers_and_tasks(client)) != (0, tasks_before):
            assert time.monotonic() < deadline, f"watchers, tasks = {state}, was 0, {tasks_before}"
            time.sleep(0.1)
        growth = rss_kib(idle.process.pid) - rss_before
    assert growth < 20_000, f"RSS grew by {growth} KiB over 400 dropped streams"


def test_metrics_count_requests_by_route_and_the_queue(working: ServerProcess) -> None:
    with working.client() as client:
        job_id = submit(client)
        client.get(f"/job/{job_id}", params={"wait": 20})
        client.get("/job/" + "0" * 32)
        text = client.get("/metrics").text
    assert 'tandem_http_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'route="/job/{job_id}",status="404"' in text
    assert job_id not in text  # ids are never label values
    assert 'tandem_fast_inference_seconds_count{model="tiny_fast"}' in text
    assert metric(text, "tandem_queue_length") >= 0
    assert metric(text, "tandem_store_used_bytes") > 0  # its SQLite file
    assert metric(text, "tandem_store_room_bytes") > 0
    assert 'tandem_jobs_total{outcome="done"}' in text
    assert "tandem_model_agreement_ratio" in text


def test_metrics_show_how_long_jobs_waited_for_their_accurate_answer(
    working: ServerProcess,
) -> None:
    """Counted by the worker and written with its heartbeat (every 5 s)."""
    with working.client() as client:
        before = metric(client.get("/metrics").text, "tandem_accurate_answer_seconds_count")
        wait_for_job(client, submit(client))
        deadline = time.monotonic() + 15
        while (
            count := metric(client.get("/metrics").text, "tandem_accurate_answer_seconds_count")
        ) == before:
            assert time.monotonic() < deadline, "the answer was never counted"
            time.sleep(0.2)
        text = client.get("/metrics").text
    assert count >= before + 1  # jobs of earlier tests may be written with it
    assert 'tandem_accurate_answer_seconds_bucket{le="+Inf"} ' + f"{count}" in text
    assert 0.0 < metric(text, "tandem_accurate_answer_seconds_sum") < 60.0
