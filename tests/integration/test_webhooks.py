"""Webhooks to a real receiver on loopback, from the embedded worker of an in-process app."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tandem.errors import CallbackNotAllowed, ConfigurationError, QueueUnavailable
from tandem.jobs.records import Delivery, DeliveryState, JobSpec, new_job_id
from tandem.jobs.sqlite import SQLiteJobStore
from tandem.predictions import Prediction, Scored
from tandem.runtime.classifier import load_classifier
from tandem.settings import Settings, load_settings
from tandem.webhooks import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    WebhookPolicy,
    WebhookSender,
    verify,
)
from tandem.worker import Worker, WorkerConfig
from tests.support import encode, metric, solid

SECRET = "a-secret-of-at-least-16-chars"  # noqa: S105 (a test key)
PNG = encode(solid((30, 30, 200)), "PNG")
PREDICTION = Prediction("tiny_accurate", (Scored(6, "class 6", 0.9),), 1.0)


@dataclass
class Receiver:
    """Answers with the statuses it is given, in turn (then 200), and keeps what it got."""

    statuses: list[int] = field(default_factory=list)
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None
    delay_s: float = 0.0  # before each answer
    # "endless": a 200 whose body never ends; "trickle": a head sent a byte at a time.
    answer: str = "plain"

    @property
    def host(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}{path}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(state.delay_s)
            state.received.append((dict(self.headers.items()), body))
            if state.answer != "plain":
                self._stream(state.answer)
                return
            status = state.statuses.pop(0) if state.statuses else 200
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", "http://elsewhere.invalid/")
            self.end_headers()

        def _stream(self, answer: str) -> None:
            """Write until the client hangs up, or for 20 s at most."""
            head, part = (b"HTTP/1.1 200 OK\r\n\r\n", b"x" * 65536)
            if answer == "trickle":
                head, part = (b"HTTP/1.1 200 OK\r\nX-Slow: ", b"x")
            deadline = time.monotonic() + 20
            with contextlib.suppress(OSError):
                self.wfile.write(head)
                while time.monotonic() < deadline:
                    self.wfile.write(part)
                    self.wfile.flush()
                    time.sleep(0.2 if answer == "trickle" else 0.001)

        def log_message(self, *args: object) -> None:
            pass

    state.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=state.server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.server.shutdown()


@pytest.fixture
def make_client(tiny_dir: Path, tmp_path: Path, open_app: Any) -> Any:
    def make(receiver: Receiver, **overrides: Any) -> TestClient:
        settings = Settings(
            data_dir=tmp_path,
            model_dir=tiny_dir,
            fast_model="tiny_fast",
            accurate_model="tiny_accurate",
            webhook_hosts=(receiver.host,),
            webhook_secret=SECRET,
            webhook_backoff_s=0.05,
            **overrides,
        )
        client: TestClient = open_app(settings)
        return client

    return make


def predict(client: TestClient, callback_url: str) -> Any:
    return client.post(
        "/predict",
        content=PNG,
        headers={"Content-Type": "image/png"},
        params={"callback_url": callback_url},
    )


def settled(client: TestClient, job_id: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/job/{job_id}").json()
        if job["webhook"] and job["webhook"]["state"] != "pending":
            return job
        time.sleep(0.05)
    raise AssertionError(f"webhook still pending: {job}")


def test_the_result_is_posted_once_signed(make_client: Any, receiver: Receiver) -> None:
    client = make_client(receiver)
    response = predict(client, receiver.url())
    assert response.status_code == 200, response.text
    job = settled(client, response.json()["job_id"])
    assert job["webhook"] == {
        "url": receiver.url(),
        "state": "delivered",
        "attempts": 1,
        "last_error": None,
    }
    (headers, body) = receiver.received[0]
    assert len(receiver.received) == 1
    assert verify(SECRET, body, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER])
    assert not verify(
        "another-secret-entirely", body, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER]
    )
    sent = json.loads(body)
    assert sent["job_id"] == job["job_id"]
    assert sent["status"] == "done"
    assert sent["accurate"]["model"] == "tiny_accurate"
    assert sent["final_label"] == job["final"]["label"]


def test_failures_are_retried_with_backoff(make_client: Any, receiver: Receiver) -> None:
    receiver.statuses = [503, 500]
    client = make_client(receiver)
    job = settled(client, predict(client, receiver.url()).json()["job_id"])
    assert job["webhook"]["state"] == "delivered"
    assert job["webhook"]["attempts"] == 3
    assert len(receiver.received) == 3
    assert _webhooks_total(client) == {"delivered": 1, "failed": 0, "retried": 2}


def test_it_gives_up_after_the_last_attempt(make_client: Any, receiver: Receiver) -> None:
    receiver.statuses = [500] * 10
    client = make_client(receiver, webhook_max_attempts=3)
    job = settled(client, predict(client, receiver.url()).json()["job_id"])
    assert job["webhook"]["state"] == "failed"
    assert job["webhook"]["attempts"] == 3
    assert job["webhook"]["last_error"] == "HTTP 500 from the receiver"
    assert job["status"] == "done"  # the job itself is fine
    assert _webhooks_total(client) == {"delivered": 0, "failed": 1, "retried": 2}


def _webhooks_total(client: TestClient) -> dict[str, int]:
    """Deliveries by outcome, as /metrics shows them: nothing said a receiver was failing."""
    text = client.get("/metrics").text
    return {
        outcome: int(metric(text, f'tandem_webhooks_total{{outcome="{outcome}"}}'))
        for outcome in ("delivered", "failed", "retried")
    }


@pytest.mark.parametrize("status", [410, 302])
def test_client_errors_and_redirects_are_not_retried_or_followed(
    make_client: Any, receiver: Receiver, status: int
) -> None:
    receiver.statuses = [status]
    client = make_client(receiver)
    job = settled(client, predict(client, receiver.url()).json()["job_id"])
    assert job["webhook"]["state"] == "failed"
    assert job["webhook"]["attempts"] == 1
    assert len(receiver.received) == 1


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",  # not on the allowlist
        "http://127.0.0.1:1/hook",  # the right host, another port
        "file:///etc/passwd",
        "not a url",
        "http://[::1/hook",  # urllib cannot split it: was a 500
    ],
)
def test_a_callback_off_the_allowlist_is_422_and_costs_nothing(
    make_client: Any, receiver: Receiver, url: str
) -> None:
    client = make_client(receiver)
    response = predict(client, url)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "callback_not_allowed"
    assert client.get("/stats").json()["requests"] == 0  # the fast model never ran
    assert receiver.received == []


@pytest.mark.parametrize(
    "suffix",
    [
        "\x00",  # a control character: no HTTP client sends it
        "\r\nX-Injected: 1",  # a header smuggled into the request line
    ],
)
def test_a_callback_on_the_allowlist_that_is_no_url_is_422(
    make_client: Any, receiver: Receiver, suffix: str
) -> None:
    """Its host passed the allowlist, so the job was queued and every delivery then failed
    unrecorded, taken up again at each sweep."""
    client = make_client(receiver)
    response = predict(client, receiver.url() + suffix)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "callback_not_allowed"
    assert error["message"].startswith("callback_url is not a valid URL")
    assert client.get("/stats").json()["requests"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1/hook",  # urllib raised ValueError: a 500
        "http://hooks.example:99999/hook",  # a port out of range
        "http://hooks.example:0/hook",  # no port to call
        "http://hooks.example/\x7f",
    ],
)
def test_the_allowlist_refuses_what_is_no_url_whatever_its_host(url: str) -> None:
    policy = WebhookPolicy(allowed_hosts=frozenset({"hooks.example", "::1"}), secret=SECRET)
    with pytest.raises(CallbackNotAllowed, match="not a valid URL"):
        policy.check(url)
    assert policy.check("http://hooks.example:8080/hook") == "http://hooks.example:8080/hook"


@pytest.mark.parametrize("userinfo", ["user:secret@", "user@", ":secret@"])
def test_a_callback_with_credentials_is_422_and_not_echoed(
    make_client: Any, receiver: Receiver, userinfo: str
) -> None:
    """Its host is allowed, but the credentials would be stored with the job, shown by
    GET /job/{id} to anyone holding the id, and sent as Basic auth."""
    client = make_client(receiver)
    response = predict(client, f"http://{userinfo}{receiver.host}/hook")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "callback_not_allowed"
    assert "credentials" in error["message"]
    assert "secret" not in response.text.replace(SECRET, "")
    assert client.get("/stats").json()["requests"] == 0
    assert receiver.received == []


def test_a_delivery_that_fails_unexpectedly_is_recorded_as_failed(
    make_client: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not left pending, to be taken up and fail again at every sweep."""

    async def broken(self: WebhookSender, *post: object) -> None:
        raise RuntimeError("a bug in the sender")

    monkeypatch.setattr(WebhookSender, "_post", broken)
    client = make_client(receiver)
    job = settled(client, predict(client, receiver.url()).json()["job_id"])
    assert job["webhook"]["state"] == "failed"
    assert job["webhook"]["last_error"] == "RuntimeError: a bug in the sender"
    assert receiver.received == []


def test_a_count_the_store_refuses_leaves_the_delivery_recorded(
    make_client: Any, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At Redis's memory limit a counter's write is refused where the delivery's state, in
    a script that runs there, is not: left pending, the post would be made again."""
    add_counts = SQLiteJobStore.add_counts

    async def refusing(self: SQLiteJobStore, counts: dict[str, int]) -> None:
        if any(name.startswith("webhooks_") for name in counts):
            raise QueueUnavailable("Redis refused: command not allowed (OOM)")
        await add_counts(self, counts)

    monkeypatch.setattr(SQLiteJobStore, "add_counts", refusing)
    client = make_client(receiver)
    job = settled(client, predict(client, receiver.url()).json()["job_id"])
    assert job["webhook"]["state"] == "delivered"
    assert len(receiver.received) == 1


def test_webhooks_are_off_without_an_allowlist(
    tiny_dir: Path, tmp_path: Path, open_app: Any
) -> None:
    tiny = {"model_dir": tiny_dir, "fast_model": "tiny_fast", "accurate_model": "tiny_accurate"}
    response = predict(open_app(Settings(data_dir=tmp_path, **tiny)), "http://127.0.0.1:9/hook")
    assert response.status_code == 422
    assert "off" in response.json()["error"]["message"]


def test_an_allowlist_without_a_secret_stops_start_up() -> None:
    with pytest.raises(ConfigurationError, match="webhook_secret"):
        load_settings({"TANDEM_WEBHOOK_HOSTS": "hooks.example.com"})


def test_a_job_that_fails_is_posted_too(make_client: Any, receiver: Receiver) -> None:
    client = make_client(receiver)
    # The proxy refuses a bad image before any job; one that only the worker cannot read
    # (a store written by something else) is stored here directly.
    job_spec = JobSpec(id=new_job_id(), image=b"not an image", callback_url=receiver.url())
    client.portal.call(client.app.state.service.store.enqueue, job_spec)
    job = settled(client, job_spec.id)
    assert job["status"] == "failed"
    assert job["webhook"]["state"] == "delivered"
    (_, body) = receiver.received[0]
    sent = json.loads(body)
    assert (sent["job_id"], sent["status"], sent["accurate"]) == (job_spec.id, "failed", None)


async def test_a_worker_takes_up_webhooks_no_worker_is_delivering(
    tiny_dir: Path, tmp_path: Path, receiver: Receiver
) -> None:
    """One job finished where no worker posted it (its reply lost, say), one left pending by
    a worker that stopped after its first attempt: a starting worker posts both."""
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    lost, stalled = (
        JobSpec(id=new_job_id(), image=PNG, callback_url=receiver.url()) for _ in range(2)
    )
    for job_spec in (lost, stalled):
        await store.enqueue(job_spec)
    await store.claim("a-worker-that-stops", 2, 0)
    await store.complete_many({lost.id: PREDICTION, stalled.id: PREDICTION})
    left = Delivery(DeliveryState.PENDING, 1, "HTTP 503 from the receiver", time.time())
    await store.record_delivery(stalled.id, left)
    policy = WebhookPolicy(
        allowed_hosts=frozenset({receiver.host}), secret=SECRET, timeout_s=0.1, backoff_s=0.01
    )
    await asyncio.sleep(2 * policy.stalled_after_s)  # both now look abandoned
    worker = Worker(
        store,
        load_classifier("tiny_accurate", tiny_dir),
        WorkerConfig(webhooks=policy, poll_s=0.05, delivery_sweep_s=0.1),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        deadline = time.monotonic() + 10
        while len(receiver.received) < 2:  # the receiver runs on a thread of its own
            assert time.monotonic() < deadline, f"posted: {receiver.received}"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # further sweeps post nothing again
    finally:
        stop.set()
        await running
    posted = sorted(json.loads(body)["job_id"] for _, body in receiver.received)
    assert posted == sorted([lost.id, stalled.id])
    for job_id, attempts in ((lost.id, 1), (stalled.id, 2)):  # the second went on from its 1
        job = await store.get(job_id)
        assert job is not None
        assert job.webhook is not None
        assert (job.webhook.state, job.webhook.attempts) == (DeliveryState.DELIVERED, attempts)
    assert await store.undelivered(time.time() + 60, 10) == []
    await store.close()


async def test_more_finished_jobs_than_connections_wait_their_turn_not_fail(
    tmp_path: Path, receiver: Receiver
) -> None:
    """Posts beyond the client's connections waited inside the attempt's timeout: to a
    receiver slower than the jobs came, they failed (PoolTimeout) without ever reaching it."""
    receiver.delay_s = 0.3
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    policy = WebhookPolicy(
        allowed_hosts=frozenset({receiver.host}),
        secret=SECRET,
        timeout_s=1.0,
        max_attempts=1,
        concurrency=2,
    )
    sender = WebhookSender(store, policy)
    specs = [JobSpec(id=new_job_id(), image=PNG, callback_url=receiver.url()) for _ in range(10)]
    try:
        for job_spec in specs:
            await store.enqueue(job_spec)
        await store.claim("w", len(specs), 0)
        await store.complete_many(dict.fromkeys((s.id for s in specs), PREDICTION))
        for job_spec in specs:
            job = await store.get(job_spec.id)
            assert job is not None
            sender.send(job)
        deliveries = [await _delivered(store, job_spec.id) for job_spec in specs]
    finally:
        await sender.close()
        await store.close()
    assert {(d.state, d.attempts) for d in deliveries} == {(DeliveryState.DELIVERED, 1)}
    assert len(receiver.received) == len(specs)


@pytest.mark.parametrize(
    ("answer", "state", "error"),
    [
        ("endless", DeliveryState.DELIVERED, None),
        ("trickle", DeliveryState.FAILED, "TimeoutError: no answer within 1 s"),
    ],
)
async def test_a_receiver_that_never_finishes_its_answer_costs_one_timeout(
    tmp_path: Path, receiver: Receiver, answer: str, state: DeliveryState, error: str | None
) -> None:
    """httpx's timeout bounds each read, not the post: a receiver sending its head a byte at a
    time held the delivery for good, and a body without end was read into memory."""
    receiver.answer = answer
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    policy = WebhookPolicy(
        allowed_hosts=frozenset({receiver.host}), secret=SECRET, timeout_s=1.0, max_attempts=1
    )
    sender = WebhookSender(store, policy)
    job_spec = JobSpec(id=new_job_id(), image=PNG, callback_url=receiver.url())
    try:
        await store.enqueue(job_spec)
        await store.claim("w", 1, 0)
        await store.complete_many({job_spec.id: PREDICTION})
        job = await store.get(job_spec.id)
        assert job is not None
        sender.send(job)
        delivery = await _delivered(store, job_spec.id, timeout_s=5.0)
    finally:
        await sender.close()
        await store.close()
    assert (delivery.state, delivery.attempts, delivery.last_error) == (state, 1, error)


async def _delivered(store: SQLiteJobStore, job_id: str, timeout_s: float = 10.0) -> Delivery:
    """The job's delivery, once it is final."""
    async with asyncio.timeout(timeout_s):
        while True:
            job = await store.get(job_id)
            if job is not None and job.webhook is not None and job.webhook.state.final:
                return job.webhook
            await asyncio.sleep(0.02)
