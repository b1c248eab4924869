"""API keys, CORS, body limits and deadlines, on the app in-process (lifespan included)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from starlette.testclient import TestClient

import tandem
from tandem.api.app import create_app
from tandem.errors import ServiceUnavailable
from tandem.jobs.records import JobSpec, JobStatus, new_job_id
from tandem.jobs.sqlite import SQLiteJobStore
from tandem.runtime.classifier import load_classifier
from tandem.runtime.priority import GiveWay, Occupancy
from tandem.settings import Settings
from tandem.worker import Worker, WorkerConfig
from tests.support import b64, encode, fast_call_in_flight, metric, solid

IMAGE = {"image_data": b64(encode(solid((255, 0, 0)), "PNG"))}


@pytest.fixture
def make_client(tiny_dir: Path, tmp_path: Path, open_app: Any) -> Any:
    tiny = {"model_dir": tiny_dir, "fast_model": "tiny_fast", "accurate_model": "tiny_accurate"}

    def make(*, passed_on: bool = False, **overrides: Any) -> TestClient:
        client: TestClient = open_app(Settings(data_dir=tmp_path, **tiny, **overrides))
        if passed_on:  # by a proxy that leaves the root path in front of each request
            client.base_url = client.base_url.copy_with(path=2 * overrides["root_path"])
        return client

    return make


def test_without_keys_everything_is_open(make_client: Any) -> None:
    assert make_client().post("/predict", json=IMAGE).status_code == 200


# Behind a proxy's path, which it strips from each request or passes on.
ROOT_PATHS = pytest.mark.parametrize(
    ("root_path", "passed_on"),
    [("", False), ("/tandem", False), ("/tandem", True)],
    ids=["root", "stripped", "passed-on"],
)


@ROOT_PATHS
def test_api_keys_guard_every_route_but_health(
    make_client: Any, root_path: str, passed_on: bool
) -> None:
    client = make_client(api_keys="first-key,second-key", root_path=root_path, passed_on=passed_on)
    refused = client.post("/predict", json=IMAGE)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert client.get("/job/" + "0" * 32).status_code == 401
    assert client.get("/metadata").status_code == 401
    wrong = client.post("/predict", json=IMAGE, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    bearer = client.post("/predict", json=IMAGE, headers={"Authorization": "Bearer first-key"})
    assert bearer.status_code == 200
    header = client.post("/predict", json=IMAGE, headers={"X-API-Key": "second-key"})
    assert header.status_code == 200
    assert client.get("/health").status_code == 200
    assert client.get("/health/all").status_code == 200
    assert client.get("/favicon.svg").status_code == 200  # the page's icon, like the page


def test_with_api_keys_liveness_says_why_to_a_caller_with_a_key_alone(make_client: Any) -> None:
    """What stopped the embedded worker is its exception's text, which may name hosts or
    paths: /health, open to all, told it to anyone."""
    client = make_client(api_keys="first-key")
    stopped = ServiceUnavailable("the embedded worker stopped", cause="OSError('/srv/x')")
    client.app.state.service.worker_failure = stopped
    anonymous = client.get("/health")
    keyed = client.get("/health", headers={"X-API-Key": "first-key"})
    wrong = client.get("/health", headers={"X-API-Key": "nope"})
    assert anonymous.status_code == keyed.status_code == wrong.status_code == 503
    assert anonymous.json() == wrong.json() == {"health": "the embedded worker stopped"}
    assert keyed.json() == {"health": "the embedded worker stopped: OSError('/srv/x')"}


@ROOT_PATHS
def test_with_api_keys_the_docs_stay_open_and_say_how_to_send_a_key(
    make_client: Any, root_path: str, passed_on: bool
) -> None:
    """Guarded, Swagger UI could not load the schema: /docs was of no use with keys set."""
    client = make_client(api_keys="first-key", root_path=root_path, passed_on=passed_on)
    docs = client.get("/docs")
    assert docs.status_code == 200
    # Under a proxy's path, the page asks for its schema and its files through that path.
    assert f"'{root_path}/openapi.json'" in docs.text
    assert f'"{root_path}/static-offline-docs/swagger-ui-bundle.js"' in docs.text
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    }
    assert schema["security"] == [{"bearer": []}, {"apiKey": []}]
    assert schema.get("servers", []) == ([{"url": root_path}] if root_path else [])
    assert schema["paths"]["/health"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/predict"]["post"]  # the document's holds
    # Every guarded operation documents the 401 it may meet.
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path not in ("/health", "/health/all"):
                assert "401" in operation["responses"], f"{method.upper()} {path}"
    # Without keys the schema asks for none.
    assert "security" not in make_client().get("/openapi.json").json()


def test_cors_allows_only_configured_origins(make_client: Any) -> None:
    client = make_client(cors_origins="https://app.example")
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    allowed = client.options("/predict", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    other = client.options("/predict", headers=preflight | {"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_a_chunked_body_over_the_limit_is_413(make_client: Any) -> None:
    client = make_client(max_body_bytes=2048)

    def chunks() -> Iterator[bytes]:
        yield b'{"image_data": "'
        for _ in range(10):
            yield b"A" * 1024  # no Content-Length: the limit is enforced while reading
        yield b'"}'

    response = client.post(
        "/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


@pytest.fixture(scope="module")
def slow_image() -> bytes:
    """A 2000x2000 noise PNG: about 50 ms to decode here, so a 20 ms deadline surely passes
    while the server waits on the decoding thread."""
    noise = np.random.default_rng(0).integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
    return encode(noise, "PNG")


def _post_raw(client: TestClient, image: bytes) -> Any:
    return client.post("/predict", content=image, headers={"content-type": "image/png"})


def test_the_fast_model_has_a_deadline(make_client: Any, slow_image: bytes) -> None:
    client = make_client(fast_timeout_s=0.02)
    response = _post_raw(client, slow_image)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert "fast model" in response.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_every_request_has_a_deadline(make_client: Any, slow_image: bytes) -> None:
    client = make_client(request_timeout_s=0.02)
    response = _post_raw(client, slow_image)
    assert response.status_code == 504
    assert "request was not answered" in response.json()["error"]["message"]
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


def _stuck_until_terminated(classifier: Any) -> tuple[list[Any], threading.Event]:
    """Make `classifier` stick in each run until its run options are terminated, as ONNX
    Runtime's runs can be, then let ONNX Runtime refuse the run; the runs begun, and an event
    set once one was stopped. A run never terminated finishes after 10 s: its test fails."""
    predict, started, stopped = classifier.predict_tensors, [], threading.Event()

    def stuck(*args: Any, run_options: ort.RunOptions | None = None, **kwargs: Any) -> Any:
        started.append(run_options)
        deadline = time.monotonic() + 10
        while run_options is None or not run_options.terminate:
            if time.monotonic() > deadline:
                return predict(*args, run_options=run_options, **kwargs)
            time.sleep(0.001)
        stopped.set()
        return predict(*args, run_options=run_options, **kwargs)  # ORT refuses: Preempted

    classifier.predict_tensors = stuck
    return started, stopped


@pytest.mark.parametrize(
    "deadline", [{"fast_timeout_s": 0.05}, {"request_timeout_s": 0.05, "fast_timeout_s": 60}]
)
def test_a_request_past_its_deadline_stops_its_fast_models_run(
    make_client: Any, deadline: dict[str, float]
) -> None:
    client = make_client(**deadline)
    started, stopped = _stuck_until_terminated(client.app.state.service.fast)
    response = client.post("/predict", json=IMAGE)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert stopped.wait(timeout=5)  # the pool's thread is free again
    assert len(started) == 1


@pytest.mark.parametrize(
    "mode", ["one run per batch", "one run per image", "giving way to the fast model"]
)
async def test_a_worker_batch_past_its_time_fails_its_jobs_and_frees_its_thread(
    tiny_dir: Path, tmp_path: Path, mode: str
) -> None:
    store = SQLiteJobStore(tmp_path / "jobs.db")
    await store.open()
    try:
        job_ids = [new_job_id() for _ in range(3)]
        for job_id in job_ids:
            await store.enqueue(JobSpec(id=job_id, image=encode(solid((0, 0, 255)), "PNG")))
        # The deadline passes first, whatever the machine's speed (a tiny model can beat even
        # a 1 µs deadline's timer).
        classifier = load_classifier("tiny_accurate", tiny_dir)
        started, stopped = _stuck_until_terminated(classifier)
        config = WorkerConfig(job_timeout_s=0.05, one_run_per_image=mode == "one run per image")
        give_way = GiveWay(Occupancy()) if mode.startswith("giving way") else None
        worker = Worker(store, classifier, config, give_way)
        await worker.process(await store.claim(worker.id, 3, 0))
        for job_id in job_ids:
            job = await store.get(job_id)
            assert job is not None
            assert job.status is JobStatus.FAILED
            assert job.error is not None
            assert "did not finish within" in job.error
        assert stopped.wait(timeout=5)
        await asyncio.wait_for(asyncio.to_thread(worker.close), timeout=5)
        assert len(started) == 1  # the batch's other images never ran
    finally:
        await store.close()


def test_nothing_from_a_client_or_redis_is_unpickled_or_evaluated() -> None:
    unsafe_modules = {"pickle", "marshal", "shelve", "yaml", "dill", "cloudpickle"}
    found = []
    for path in Path(tandem.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in ("eval", "exec", "compile", "__import__"):
                    found.append(f"{path.name}: {node.func.id}()")
            elif isinstance(node, ast.Import):
                found += [
                    f"{path.name}: {a.name}"
                    for a in node.names
                    if a.name.split(".")[0] in unsafe_modules
                ]
            elif (
                isinstance(node, ast.ImportFrom)
                and (node.module or "").split(".")[0] in unsafe_modules
            ):
                found.append(f"{path.name}: {node.module}")
    # The one pickle read: the installed weight packages' checkpoints, by `tandem models
    # build`, through an unpickler that admits tensors alone (tests/unit/test_torchfile.py);
    # serving never imports it (tests/unit/test_cli.py).
    assert found == ["torchfile.py: pickle"]


def test_open_streams_and_long_polls_are_bounded(make_client: Any) -> None:
    client = make_client(max_watches=2, embedded_worker=False)  # the job stays queued
    job_id = client.post("/predict", json=IMAGE).json()["job_id"]
    with (
        client.stream("GET", f"/job/{job_id}/events") as first,
        client.stream("GET", f"/job/{job_id}/events") as second,
    ):
        for stream in (first, second):
            assert next(stream.iter_lines()) == "event: queued"
        for refused in (
            client.get(f"/job/{job_id}/events"),
            client.get(f"/job/{job_id}", params={"wait": 1}),
        ):
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "overloaded"
            assert refused.headers["retry-after"] == "5"
    # Closed streams free their places.
    assert client.get(f"/job/{job_id}", params={"wait": 0.1}).json()["status"] == "queued"


def test_one_client_s_streams_and_long_polls_are_bounded_by_its_share(make_client: Any) -> None:
    """Without a share, one client's streams could hold every place, and the others got 503.
    A client may have a quarter of the places here (1 of 4), so 2 of the 8 watches."""
    client = make_client(
        api_keys="alpha=a-key,beta=b-key",
        max_in_flight=4,
        max_in_flight_per_key=1,
        max_watches=8,
        embedded_worker=False,  # the job stays queued
    )
    alpha, beta = {"X-API-Key": "a-key"}, {"X-API-Key": "b-key"}
    job_id = client.post("/predict", json=IMAGE, headers=alpha).json()["job_id"]
    events = f"/job/{job_id}/events"
    with (
        client.stream("GET", events, headers=alpha) as first,
        client.stream("GET", events, headers=alpha) as second,
    ):
        for stream in (first, second):
            assert next(stream.iter_lines()) == "event: queued"
        for refused in (
            client.get(events, headers=alpha),
            client.get(f"/job/{job_id}", params={"wait": 1}, headers=alpha),
        ):
            assert refused.status_code == 429
            error = refused.json()["error"]
            assert (error["code"], error["details"]["limit"]) == ("too_many_requests", 2)
            assert refused.headers["retry-after"] == "5"
        with client.stream("GET", events, headers=beta) as others:
            assert next(others.iter_lines()) == "event: queued"
    # Closed streams give the client its share back.
    waited = client.get(f"/job/{job_id}", params={"wait": 0.1}, headers=alpha)
    assert waited.json()["status"] == "queued"
    # The API's description says so, beside the 503 of a limit for all clients.
    paths = client.get("/openapi.json").json()["paths"]
    for route in (paths["/job/{job_id}"]["get"], paths["/job/{job_id}/events"]["get"]):
        assert {"429", "503"} <= set(route["responses"])


@contextlib.contextmanager
def fast_model_overrunning(client: TestClient, seconds: float) -> Iterator[None]:
    """The fast model takes `seconds` longer, within the block."""
    fast = client.app.state.service.fast  # type: ignore[attr-defined]
    predict = fast.predict

    def stalled(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return predict(*args, **kwargs)

    fast.predict = stalled
    try:
        yield
    finally:
        del fast.predict  # the class's method again


def test_a_fast_answer_past_its_deadline_leaves_no_job_to_run(make_client: Any) -> None:
    client = make_client(fast_timeout_s=0.2, embedded_worker=False)
    # The job is stored while the fast model runs: here the model overruns its deadline.
    with fast_model_overrunning(client, 0.5):
        response = client.post("/predict", json=IMAGE)
    assert response.status_code == 504
    stats = client.get("/stats").json()
    assert stats["jobs"]["cancelled"] == 1  # stored meanwhile, then withdrawn: nobody has its id
    assert "tandem_queue_length 0.0" in client.get("/metrics").text


def test_a_retry_after_the_fast_deadline_gets_a_job_that_will_run(make_client: Any) -> None:
    """An idempotency key lets the client reach the job again: the 504 must not cancel it."""
    client = make_client(fast_timeout_s=0.2, embedded_worker=False)
    key = {"Idempotency-Key": "order-18"}
    with fast_model_overrunning(client, 0.5):
        assert client.post("/predict", json=IMAGE, headers=key).status_code == 504
    retry = client.post("/predict", json=IMAGE, headers=key)
    assert retry.status_code == 200
    job = client.get(f"/job/{retry.json()['job_id']}").json()
    assert job["status"] == "queued"
    assert job["fast"]["model"] == retry.json()["fast"]["model"]
    assert client.get("/stats").json()["jobs"].get("cancelled", 0) == 0


def test_a_key_sent_again_with_another_image_is_refused_and_costs_no_job(
    make_client: Any,
) -> None:
    hooks = {"webhook_hosts": ["hooks.example"], "webhook_secret": "s" * 16}
    client = make_client(embedded_worker=False, **hooks)
    key = {"Idempotency-Key": "order-19"}
    first = client.post("/predict", json=IMAGE, headers=key)
    blue = {"image_data": b64(encode(solid((0, 0, 255)), "PNG"))}
    reused = client.post("/predict", json=blue, headers=key)
    assert reused.status_code == 422
    error = reused.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert error["details"] == {"idempotency_key": "order-19"}
    # Nor does a different callback URL make the same request.
    hook = client.post(
        "/predict", params={"callback_url": "https://hooks.example/x"}, json=IMAGE, headers=key
    )
    assert hook.json()["error"]["code"] == "idempotency_key_reused"
    retry = client.post("/predict", json=IMAGE, headers=key)
    assert retry.json()["job_id"] == first.json()["job_id"]
    assert "tandem_queue_length 1.0" in client.get("/metrics").text  # the first request's


def test_with_api_keys_each_client_has_its_own_idempotency_keys(make_client: Any) -> None:
    """Two clients that pick the same key neither meet a 422 nor get each other's job."""
    client = make_client(api_keys="first-key,second-key", embedded_worker=False)
    blue = {"image_data": b64(encode(solid((0, 0, 255)), "PNG"))}

    def post(api_key: str, body: dict[str, str]) -> Any:
        headers = {"X-API-Key": api_key, "Idempotency-Key": "order-1"}
        return client.post("/predict", json=body, headers=headers)

    mine, theirs = post("first-key", IMAGE), post("second-key", blue)
    assert mine.status_code == theirs.status_code == 200, theirs.text
    assert mine.json()["job_id"] != theirs.json()["job_id"]
    assert post("first-key", IMAGE).json()["job_id"] == mine.json()["job_id"]
    assert post("second-key", blue).json()["job_id"] == theirs.json()["job_id"]
    assert post("second-key", IMAGE).json()["error"]["code"] == "idempotency_key_reused"


@pytest.mark.parametrize("beside_another_call", [False, True])
def test_a_request_past_its_deadline_while_storing_its_job_leaves_none_to_run(
    make_client: Any, monkeypatch: pytest.MonkeyPatch, beside_another_call: bool
) -> None:
    """Alone, the job is stored while the model runs; beside another call, after it."""
    client = make_client(request_timeout_s=0.3, embedded_worker=False)
    service = client.app.state.service  # type: ignore[attr-defined]
    enqueue = service.store.enqueue

    async def slow_to_answer(spec: Any) -> Any:
        job = await enqueue(spec)  # stored: then the deadline passes before the id is out
        await asyncio.sleep(0.6)
        return job

    monkeypatch.setattr(service.store, "enqueue", slow_to_answer)
    with fast_call_in_flight(service.calls) if beside_another_call else contextlib.nullcontext():
        assert client.post("/predict", json=IMAGE).status_code == 504
    jobs = client.get("/stats").json()["jobs"]
    assert jobs["cancelled"] == 1
    assert jobs.get("queued", 0) == 0


@contextlib.contextmanager
def fast_model_held(client: TestClient) -> Iterator[tuple[threading.Semaphore, threading.Event]]:
    """Fast-model calls wait, within the block, until the yielded event is set; the semaphore
    is released as each call begins."""
    fast = client.app.state.service.fast  # type: ignore[attr-defined]
    predict = fast.predict
    begun, release = threading.Semaphore(0), threading.Event()

    def held(*args: Any, **kwargs: Any) -> Any:
        begun.release()
        release.wait(timeout=10)
        return predict(*args, **kwargs)

    fast.predict = held
    try:
        yield begun, release
    finally:
        release.set()
        del fast.predict


@ROOT_PATHS
def test_one_api_key_holds_no_more_than_its_share_of_the_places(
    make_client: Any, root_path: str, passed_on: bool
) -> None:
    """Without a share, a client sending as fast as it could took every place, and every
    other client got 503 until it stopped."""
    client = make_client(
        root_path=root_path,
        passed_on=passed_on,
        api_keys="flooding-key,other-key",
        max_in_flight=3,
        max_in_flight_per_key=2,
        fast_concurrency=3,  # each request in flight reaches the (held) model
        embedded_worker=False,
    )
    flooding, other = {"X-API-Key": "flooding-key"}, {"X-API-Key": "other-key"}
    answers: list[int] = []

    def send(headers: dict[str, str]) -> threading.Thread:
        thread = threading.Thread(
            target=lambda: answers.append(
                client.post("/predict", json=IMAGE, headers=headers).status_code
            )
        )
        thread.start()
        return thread

    with fast_model_held(client) as (begun, release):
        held = [send(flooding), send(flooding)]
        for _ in held:
            assert begun.acquire(timeout=10)  # both in the fast model
        beyond_share = client.post("/predict", json=IMAGE, headers=flooding)
        assert beyond_share.status_code == 429
        assert beyond_share.json()["error"]["code"] == "too_many_requests"
        assert beyond_share.json()["error"]["details"]["limit"] == 2
        assert beyond_share.headers["retry-after"] == "5"
        held.append(send(other))  # the other client still gets a place: the last one
        assert begun.acquire(timeout=10)
        full = client.post("/predict", json=IMAGE, headers=other)
        assert full.status_code == 503
        assert full.json()["error"]["code"] == "overloaded"
        release.set()
        for thread in held:
            thread.join(timeout=10)
    assert answers == [200, 200, 200]
    # Each answered request gave its place back, the key's share included.
    for _ in range(3):
        assert client.post("/predict", json=IMAGE, headers=flooding).status_code == 200


def test_the_access_log_names_each_client_by_its_key_s_digest(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Which client flooded, or met 429, is in the log; the key itself never is."""
    client = make_client(api_keys="first-key,second-key", embedded_worker=False)
    with caplog.at_level(logging.INFO, logger="tandem.access"):
        client.post("/predict", json=IMAGE, headers={"X-API-Key": "second-key"})
        client.get("/health")
    keyed, open_path = (r for r in caplog.records if r.name == "tandem.access")
    key_id = hashlib.sha256(b"second-key").hexdigest()[:16]
    assert keyed.getMessage().startswith(f'"POST /predict" 200 key {key_id}; fast answer ')
    assert keyed.api_key_id == key_id  # type: ignore[attr-defined]
    assert open_path.getMessage() == '"GET /health" 200'
    assert "second-key" not in caplog.text


def test_one_api_key_holds_no_more_than_its_share_of_the_queue(make_client: Any) -> None:
    """Without a share, one client's backlog could fill the queue, and every other client's
    jobs were refused (503 queue_full) until the workers caught up with it."""
    client = make_client(
        api_keys="busy-key,other-key",
        max_queued_per_key=2,
        embedded_worker=False,  # the jobs stay queued
    )
    busy, other = {"X-API-Key": "busy-key"}, {"X-API-Key": "other-key"}
    queued = [client.post("/predict", json=IMAGE, headers=busy) for _ in range(2)]
    assert [response.status_code for response in queued] == [200, 200]
    beyond_share = client.post("/predict", json=IMAGE, headers=busy)
    assert beyond_share.status_code == 429
    body = beyond_share.json()
    assert body["error"]["code"] == "too_many_queued"
    assert body["error"]["details"]["limit"] == 2
    assert beyond_share.headers["retry-after"] == "5"
    assert body["job_id"] is None
    assert body["fast"]["label"]  # served, without a job
    assert client.post("/predict", json=IMAGE, headers=other).status_code == 200
    # A job that ends gives its place back.
    cancelled = client.delete(f"/job/{queued[0].json()['job_id']}", headers=busy)
    assert cancelled.json()["status"] == "cancelled"
    assert client.post("/predict", json=IMAGE, headers=busy).status_code == 200
    answers = client.get("/metrics", headers=other).text
    assert metric(answers, 'tandem_fast_answers_total{job="too_many_queued"}') == 1
    assert metric(answers, 'tandem_fast_answers_total{job="queued"}') == 4


def test_a_client_s_keys_under_one_name_are_one_client(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """While a client moves from an old key to a new one, both listed under its name: its
    share of the queue and its idempotency keys are the name's, and the log names it."""
    client = make_client(
        api_keys="alice=old-key-0123456789,alice=new-key-0123456789,bob=bob-key-0123456789",
        max_queued_per_key=2,
        embedded_worker=False,
    )
    old, new = {"X-API-Key": "old-key-0123456789"}, {"X-API-Key": "new-key-0123456789"}
    with caplog.at_level(logging.INFO, logger="tandem.access"):
        first = client.post("/predict", json=IMAGE, headers={**old, "Idempotency-Key": "o-1"})
    (line,) = (r for r in caplog.records if r.name == "tandem.access")
    assert line.getMessage().startswith('"POST /predict" 200 key alice; fast answer ')
    assert line.api_key_id == "alice"  # type: ignore[attr-defined]
    retried = client.post("/predict", json=IMAGE, headers={**new, "Idempotency-Key": "o-1"})
    assert retried.json()["job_id"] == first.json()["job_id"]  # the same client's retry
    assert client.post("/predict", json=IMAGE, headers=new).status_code == 200
    beyond_share = client.post("/predict", json=IMAGE, headers=old)
    assert beyond_share.json()["error"]["code"] == "too_many_queued"
    bob = {"X-API-Key": "bob-key-0123456789"}
    assert client.post("/predict", json=IMAGE, headers=bob).status_code == 200
    counted = client.get("/metrics", headers=bob).text
    alice = 'tandem_client_requests_total{client="alice",route="/predict",status='
    assert metric(counted, alice + '"200"}') == 3
    assert metric(counted, alice + '"429"}') == 1
    assert (
        metric(counted, 'tandem_client_requests_total{client="bob",route="/predict",status="200"}')
        == 1
    )


@pytest.mark.parametrize("private", [True, False])
def test_with_private_jobs_another_client_finds_no_job(make_client: Any, private: bool) -> None:
    """Job ids are the handle: without private jobs whoever holds one reads the job, as the
    original API did. With them, a job is its client's alone, as in a service many tenants
    share; to another it is an unknown id, so that not even its being there leaks."""
    client = make_client(
        api_keys="alice=old-key-0123456789,alice=new-key-0123456789,bob=bob-key-0123456789",
        private_jobs=private,
        embedded_worker=False,
    )
    old, new = {"X-API-Key": "old-key-0123456789"}, {"X-API-Key": "new-key-0123456789"}
    bob = {"X-API-Key": "bob-key-0123456789"}
    job_id = client.post("/predict", json=IMAGE, headers=old).json()["job_id"]
    seen_by_bob = [
        client.get(f"/job/{job_id}", headers=bob),
        client.get(f"/job/{job_id}", params={"wait": 0.2}, headers=bob),
        client.get(f"/job/{job_id}/events", headers=bob) if private else None,
        client.delete(f"/job/{job_id}", headers=bob) if private else None,
    ]
    if private:
        for response in seen_by_bob:
            assert response is not None
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "job_not_found"
        assert client.get(f"/job/{job_id}", headers=new).json()["status"] == "queued"
        assert client.delete(f"/job/{job_id}", headers=new).json()["status"] == "cancelled"
    else:
        assert [r.status_code for r in seen_by_bob if r is not None] == [200, 200]


def test_with_private_jobs_a_job_sent_before_keys_is_no_client_s(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A job stored while the service was open has no client. Once jobs are private, an id
    that leaked while it was open must not read it for whoever holds a key."""
    tiny = {"model_dir": tiny_dir, "fast_model": "tiny_fast", "accurate_model": "tiny_accurate"}
    opened = Settings(data_dir=tmp_path, embedded_worker=False, **tiny)
    with TestClient(create_app(opened), raise_server_exceptions=False) as client:
        job_id = client.post("/predict", json=IMAGE).json()["job_id"]
    private = Settings(
        data_dir=tmp_path,
        embedded_worker=False,
        api_keys="alice=alice-key-0123456789",
        private_jobs=True,
        **tiny,
    )
    alice = {"X-API-Key": "alice-key-0123456789"}
    with TestClient(create_app(private), raise_server_exceptions=False) as client:
        answers = [
            client.get(f"/job/{job_id}", headers=alice),
            client.get(f"/job/{job_id}/events", headers=alice),
            client.delete(f"/job/{job_id}", headers=alice),
        ]
    assert [r.json()["error"]["code"] for r in answers] == ["job_not_found"] * 3
