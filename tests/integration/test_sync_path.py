"""The sync path's writes: the answer waits for the durable job, not for the fast answer's
write, and the client's own reads still see that write."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import tandem
from tandem import service
from tandem.api import app as app_module
from tandem.api.app import create_app
from tandem.errors import ConfigurationError, QueueFull, QueueUnavailable, ServiceUnavailable
from tandem.jobs.records import Job, JobSpec, load_meta
from tandem.jobs.sqlite import MIB, SQLiteJobStore
from tandem.predictions import Prediction
from tandem.settings import Settings
from tests.support import (
    RedisServer,
    TinySpec,
    encode,
    fast_call_in_flight,
    fill,
    metric,
    noise,
    overwrite_meta,
    solid,
    tiny_model,
)

RED = encode(solid((255, 0, 0)), "PNG")


class _HeldFastAnswers(SQLiteJobStore):
    """Holds each fast answer's write until the test lets it go."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = threading.Event()
        self.attached: list[str] = []

    async def attach_fast(self, job_id: str, fast: Prediction) -> Prediction | None:
        await asyncio.to_thread(self.release.wait)  # set from the test's thread
        reported = await super().attach_fast(job_id, fast)
        self.attached.append(job_id)
        return reported


class _DamagedFile(SQLiteJobStore):
    """A store whose file went bad: each enqueue fails as SQLite does on a damaged page."""

    async def enqueue(self, spec: JobSpec) -> Job:
        raise sqlite3.DatabaseError("database disk image is malformed")


def _settings(tiny_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path,
        model_dir=tiny_dir,
        fast_model="tiny_fast",
        accurate_model="tiny_accurate",
        embedded_worker=False,
    )


def _post(client: TestClient) -> str:
    response = client.post("/predict", content=RED, headers={"Content-Type": "image/png"})
    assert response.status_code == 200, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def test_start_up_says_which_release_serves_which_models_and_where_the_jobs_are(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="tandem.api"),
        TestClient(create_app(_settings(tiny_dir, tmp_path))),
    ):
        pass
    assert (
        f"tandem {tandem.__version__} serving tiny_fast now, tiny_accurate later; jobs in SQLite"
        f" at {tmp_path / 'tandem.db'}"
    ) in caplog.messages


def test_the_answer_does_not_wait_for_the_fast_answer_to_be_written(
    tiny_dir: Path, tmp_path: Path
) -> None:
    store = _HeldFastAnswers(tmp_path / "jobs.db")
    with TestClient(create_app(_settings(tiny_dir, tmp_path), store=store)) as client:
        threading.Timer(5.0, store.release.set).start()  # a proxy that waits for it answers late
        job_id = _post(client)
        assert store.attached == []  # answered while the write was held
        threading.Timer(0.2, store.release.set).start()
        job = client.get(f"/job/{job_id}").json()  # waits for this proxy's own write
        assert store.attached == [job_id]
        assert job["fast"]["label"] == "class 1"  # the tiny fast model: red votes 1
        assert job["final"]["label"] == "class 1"


def test_a_cancel_answers_with_the_fast_answer_too(tiny_dir: Path, tmp_path: Path) -> None:
    store = _HeldFastAnswers(tmp_path / "jobs.db")
    with TestClient(create_app(_settings(tiny_dir, tmp_path), store=store)) as client:
        threading.Timer(5.0, store.release.set).start()
        job_id = _post(client)
        threading.Timer(0.2, store.release.set).start()
        response = client.delete(f"/job/{job_id}")  # waits for this proxy's own write
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert response.json()["fast"]["label"] == "class 1"


def test_shutdown_finishes_writing_fast_answers(tiny_dir: Path, tmp_path: Path) -> None:
    store = _HeldFastAnswers(tmp_path / "jobs.db")
    with TestClient(create_app(_settings(tiny_dir, tmp_path), store=store)) as client:
        job_id = _post(client)
        threading.Timer(0.2, store.release.set).start()
    assert store.attached == [job_id]
    with sqlite3.connect(tmp_path / "jobs.db") as conn:
        (meta,) = conn.execute("SELECT meta FROM jobs WHERE id = ?", (job_id,)).fetchone()
    fast = load_meta(meta).fast
    assert fast is not None
    assert fast.label == "class 1"


def _wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_next_request_s_decoded_image_starts_the_write(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "ANSWER_WRITE_AFTER_S", 60.0)  # only the next request, here
    store = _HeldFastAnswers(tmp_path / "jobs.db")
    store.release.set()
    with TestClient(create_app(_settings(tiny_dir, tmp_path), store=store)) as client:
        first = _post(client)
        time.sleep(0.3)
        assert store.attached == []  # waiting for a moment when the fast path needs one core
        second = _post(client)
        assert _wait_for(lambda: first in store.attached)
        assert second not in store.attached


def test_with_no_other_request_the_answer_is_written_soon(tiny_dir: Path, tmp_path: Path) -> None:
    store = _HeldFastAnswers(tmp_path / "jobs.db")
    store.release.set()
    with TestClient(create_app(_settings(tiny_dir, tmp_path), store=store)) as client:
        job_id = _post(client)
        # Nothing reads the job through the proxy: the write happens on its own.
        assert _wait_for(lambda: store.attached == [job_id])  # before the shutdown's drain


class _Recorded(SQLiteJobStore):
    """Records whether each job came with its fast answer, and the answers added after."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.enqueued_with_fast: list[bool] = []
        self.attached: list[str] = []

    async def enqueue(self, spec: JobSpec) -> Job:
        self.enqueued_with_fast.append(spec.fast is not None)
        return await super().enqueue(spec)

    async def attach_fast(self, job_id: str, fast: Prediction) -> Prediction | None:
        self.attached.append(job_id)
        return await super().attach_fast(job_id, fast)


def test_beside_another_fast_call_the_job_is_stored_with_its_answer_in_one_write(
    tiny_dir: Path, tmp_path: Path
) -> None:
    store = _Recorded(tmp_path / "jobs.db")
    with TestClient(create_app(_settings(tiny_dir, tmp_path), store=store)) as client:
        alone = _post(client)  # stored while its model runs, its answer added after
        with fast_call_in_flight(client.app.state.service.calls):  # type: ignore[attr-defined]
            beside = _post(client)
        job = client.get(f"/job/{beside}").json()
        assert _wait_for(lambda: store.attached == [alone])
    assert store.enqueued_with_fast == [False, True]
    assert store.attached == [alone]
    assert job["fast"]["label"] == "class 1"


@pytest.mark.parametrize(("spin", "stop_after_run"), [(None, "1"), ("always", None)])
def test_the_fast_models_threads_wait_as_configured(
    tiny_dir: Path,
    tmp_path: Path,
    open_app: Callable[[Settings], TestClient],
    spin: str | None,
    stop_after_run: str | None,
) -> None:
    told = {} if spin is None else {"fast_spin": spin}
    client = open_app(Settings(**_settings(tiny_dir, tmp_path).model_dump() | told))
    fast = client.app.state.service.fast  # type: ignore[attr-defined]
    for session in (fast._session, fast._solo):
        if session is None:  # one CPU: no session with more threads
            continue
        options = session.get_session_options()
        try:
            found = str(options.get_session_config_entry("session.force_spinning_stop"))
        except RuntimeError:  # never set: ONNX Runtime's default, spinning on after a run
            found = None
        assert found == stop_after_run


@pytest.mark.parametrize(("told", "pinned"), [({}, True), ({"fast_pin": False}, False)])
def test_a_lone_fast_call_runs_on_cpus_of_its_own_unless_told_not_to(
    tiny_dir: Path,
    tmp_path: Path,
    open_app: Callable[[Settings], TestClient],
    told: dict[str, bool],
    pinned: bool,
) -> None:
    client = open_app(Settings(**_settings(tiny_dir, tmp_path).model_dump() | told))
    fast = client.app.state.service.fast  # type: ignore[attr-defined]
    two_cpus = len(os.sched_getaffinity(0)) >= 2  # one CPU: nothing to place
    assert (fast._placement is not None) == (pinned and two_cpus)
    assert _post(client)  # it answers


def test_while_serving_the_start_up_heap_is_out_of_the_collectors_way(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A full collection would walk the whole start-up heap with the GIL held (30 to 45 ms in
    a proxy), stalling every request in flight."""
    assert gc.get_freeze_count() == 0
    with TestClient(create_app(_settings(tiny_dir, tmp_path))) as client:
        assert gc.get_freeze_count() > 10_000  # the modules, the app and the models' wrappers
        _post(client)
        garbage: list[object] = []
        garbage.append(garbage)  # a cycle made while serving is still collected
        del garbage
        assert gc.collect() > 0
    assert gc.get_freeze_count() == 0  # what served can be collected again


def test_a_job_this_version_cannot_read_gets_a_typed_error(
    tiny_dir: Path, tmp_path: Path, open_app: Callable[[Settings], TestClient]
) -> None:
    client = open_app(_settings(tiny_dir, tmp_path))
    job_id = _post(client)
    overwrite_meta(tmp_path / "tandem.db", '{"v": 2}', job_id)  # as a newer Tandem writes it
    response = client.get(f"/job/{job_id}")
    assert response.status_code == 500
    error = response.json()["error"]
    assert (error["code"], error["details"]) == ("unreadable_job", {"job_id": job_id})
    assert "unsupported job payload version 2" in error["message"]


def test_a_fast_answer_for_a_job_rewritten_by_a_newer_version_is_dropped_with_a_warning(
    tiny_dir: Path,
    tmp_path: Path,
    open_app: Callable[[Settings], TestClient],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It was logged as an unexpected failure, with a traceback."""
    monkeypatch.setattr("tandem.service.ANSWER_WRITE_AFTER_S", 3600.0)  # written when read
    client = open_app(_settings(tiny_dir, tmp_path))
    job_id = _post(client)
    overwrite_meta(tmp_path / "tandem.db", '{"v": 2}', job_id)
    with caplog.at_level(logging.WARNING, logger="tandem.service"):
        assert client.get(f"/job/{job_id}").status_code == 500  # unreadable_job, as above
    (record,) = [r for r in caplog.records if r.name == "tandem.service"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert f"not added to job {job_id}" in record.getMessage()
    assert "unsupported job payload version 2" in record.getMessage()


def test_the_request_counts_reach_the_store_after_a_failed_flush(
    tiny_dir: Path,
    tmp_path: Path,
    open_app: Callable[[Settings], TestClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The background flush stopped for good on any error but an unavailable queue, and the
    counts it had taken were dropped."""
    monkeypatch.setattr(app_module, "STATS_FLUSH_S", 0.05)
    client = open_app(_settings(tiny_dir, tmp_path))
    store = client.app.state.service.store  # type: ignore[attr-defined]
    add_counts, failures = store.add_counts, []

    async def failing_once(counts: dict[str, int]) -> None:
        if not failures:
            failures.append(counts)
            raise RuntimeError("a bug in the store")
        await add_counts(counts)

    def seen_in_store() -> int:
        counts = client.portal.call(store.counts)
        return sum(n for name, n in counts.items() if name.startswith("seen:"))

    monkeypatch.setattr(store, "add_counts", failing_once)
    _post(client)
    deadline = time.monotonic() + 5
    while seen_in_store() == 0:
        assert time.monotonic() < deadline, "the counts never reached the store"
        time.sleep(0.02)
    assert failures  # the first flush failed, and a later one wrote the same counts
    assert seen_in_store() == 1


@pytest.mark.parametrize("beside_another", [False, True])
def test_a_fault_storing_the_job_still_gives_the_fast_answer(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, beside_another: bool
) -> None:
    """An error the store did not foresee (here a damaged file) was a 500 that threw the fast
    answer away. It is a 503 like any queue that cannot take the job, with the fast answer;
    the traceback goes to the log. Both paths: stored while the model runs (a request alone)
    and after it (beside another call)."""
    store = _DamagedFile(tmp_path / "jobs.db")
    with TestClient(create_app(_settings(tiny_dir, tmp_path), store=store)) as client:
        service_calls = client.app.state.service.calls  # type: ignore[attr-defined]
        with fast_call_in_flight(service_calls) if beside_another else contextlib.nullcontext():
            response = client.post("/predict", content=RED, headers={"Content-Type": "image/png"})
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["job_id"] is None
    assert body["tiny_fast"] == "class 1"
    assert body["error"]["code"] == "queue_unavailable"
    assert body["error"]["message"] == "the job could not be stored; see the server log"
    assert response.headers["Retry-After"] == "5"
    assert "database disk image is malformed" in caplog.text


# What redis-py says of a server it cannot reach: its address, for the operator alone.
REFUSED = "Error 111 connecting to 10.1.2.3:6379. Connection refused."


class _Away(SQLiteJobStore):
    """A queue that refuses new jobs while `away` (Redis down), or answers that it is full."""

    away: type[ServiceUnavailable] | None = QueueUnavailable

    async def enqueue(self, spec: JobSpec) -> Job:
        if self.away is not None:
            raise self.away("Redis is unavailable", cause=REFUSED)
        return await super().enqueue(spec)

    async def ping(self) -> None:
        if self.away is not None:
            raise self.away("Redis is unavailable", cause=REFUSED)
        await super().ping()


def test_an_unavailable_queue_is_logged_when_it_goes_and_when_it_comes_back(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy whose Redis refused it had said nothing in its log: only /health/all and
    each client's 503 told. A full queue is load, not a fault, and is not logged."""
    caplog.set_level(logging.INFO, logger="tandem.service")
    store = _Away(tmp_path / "jobs.db")
    with TestClient(create_app(_settings(tiny_dir, tmp_path), store=store)) as client:
        for away in (QueueUnavailable, QueueUnavailable, QueueUnavailable, None, QueueFull):
            store.away = away
            response = client.post("/predict", content=RED, headers={"Content-Type": "image/png"})
            assert response.status_code == (200 if away is None else 503)
    lines = [r.getMessage() for r in caplog.records if r.name == "tandem.service"]
    assert [re.sub(r"\d+ s$", "N s", line) for line in lines] == [
        f"storing new jobs failed: Redis is unavailable: {REFUSED}",
        "storing new jobs recovered after N s",
    ]


def test_metrics_go_on_while_redis_is_away_with_the_store_left_out(
    tiny_dir: Path, tmp_path: Path, open_app: Callable[[Settings], TestClient]
) -> None:
    """/metrics answered 503 while Redis was down: the proxy's own counts, its 503s among them,
    went unseen just when they told most. The store's are left out, not zeroed: a counter
    that read 0 would look reset."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        settings = _settings(tiny_dir, tmp_path).model_dump() | {"redis_url": redis.url}
        client = open_app(Settings(**settings))
        _post(client)
        up = client.get("/metrics").text
        assert metric(up, "tandem_store_up") == 1
        assert metric(up, "tandem_queue_length") == 1
        assert 0 < metric(up, "tandem_store_room_bytes") < 1024**3  # its maxmemory: 1 GB
        redis.kill()
        refused = client.post("/predict", content=RED, headers={"Content-Type": "image/png"})
        assert refused.status_code == 503
        away = client.get("/metrics")
        assert away.status_code == 200, away.text
        assert metric(away.text, "tandem_store_up") == 0
        assert 'tandem_fast_answers_total{job="queue_unavailable"} 1.0' in away.text
        assert "tandem_jobs_total" not in away.text
        assert "tandem_queue_length" not in away.text
        redis.start()
        assert metric(client.get("/metrics").text, "tandem_store_up") == 1
    finally:
        redis.kill()


def test_what_failed_underneath_is_logged_and_told_only_to_callers_with_a_key(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis error names the server's address. It went out in every 503 and on
    /health/all, which needs no key: to anyone who could reach the proxy."""
    keyed = Settings(**_settings(tiny_dir, tmp_path).model_dump() | {"api_keys": ("k",)})
    with TestClient(create_app(keyed, store=_Away(tmp_path / "jobs.db"))) as client:
        with_key = {"X-API-Key": "k"}
        png = {"Content-Type": "image/png"}
        refused = client.post("/predict", content=RED, headers=with_key | png)
        anonymous = client.get("/health/all")
        operator = client.get("/health/all", headers=with_key)
    assert refused.status_code == anonymous.status_code == operator.status_code == 503
    assert refused.json()["error"]["message"] == "Redis is unavailable"
    assert anonymous.json()["queue"] == "Redis is unavailable"
    assert operator.json()["queue"] == f"Redis is unavailable: {REFUSED}"
    assert "10.1.2.3" not in refused.text + anonymous.text
    assert f"storing new jobs failed: Redis is unavailable: {REFUSED}" in caplog.text


def test_a_disk_under_its_floor_refuses_new_jobs_with_the_fast_answer_and_readiness_fails(
    tiny_dir: Path, tmp_path: Path, open_app: Callable[[Settings], TestClient]
) -> None:
    """On a 3 MB file system filled by new jobs, every write failed, the worker's too, so
    nothing finished until space was freed, and /health/all said ok throughout. The store
    keeps a floor free for its workers, and readiness says why no job is taken."""
    free_mib = shutil.disk_usage(tmp_path).free // MIB
    floor = {"min_free_disk_mb": free_mib + 1024, "embedded_worker": True}
    client = open_app(Settings(**_settings(tiny_dir, tmp_path).model_dump() | floor))
    response = client.post("/predict", content=RED, headers={"Content-Type": "image/png"})
    assert response.status_code == 503, response.text
    body = response.json()
    assert (body["job_id"], body["tiny_fast"]) == (None, "class 1")
    assert body["error"]["code"] == "disk_low"
    assert body["error"]["details"]["min_free_bytes"] == (free_mib + 1024) * MIB
    assert response.headers["Retry-After"] == "5"

    def ready() -> dict[str, str]:
        health = client.get("/health/all")
        assert health.status_code == 503
        report: dict[str, str] = health.json()
        return report

    assert _wait_for(lambda: ready()["tiny_accurate"] == "ok")  # its worker goes on
    assert f"under its floor of {free_mib + 1024} MiB" in ready()["queue"]


def test_a_full_disk_refuses_new_jobs_as_disk_low_and_readiness_fails_until_there_is_room(
    tiny_dir: Path, small_disk: Path, open_app: Callable[[Settings], TestClient]
) -> None:
    """With no floor set, a disk too full for a photo took every new job as 503
    queue_unavailable, while /health/all, whose write is small, said ok."""
    settings = _settings(tiny_dir, small_disk).model_dump() | {"min_free_disk_mb": 0}
    client = open_app(Settings(**settings | {"embedded_worker": True}))
    png = {"Content-Type": "image/png"}
    photo = encode(noise(400, 400), "PNG")  # some 480 KB, as little compressible as a photo
    filler = fill(small_disk, leaving=64 * 1024)
    refused = client.post("/predict", content=photo, headers=png)
    assert refused.status_code == 503, refused.text
    body = refused.json()
    assert body["job_id"] is None
    assert body["tiny_fast"].startswith("class ")  # the fast answer all the same
    assert body["error"]["code"] == "disk_low"
    assert body["error"]["details"]["needed_bytes"] == 2 * len(photo)
    health = client.get("/health/all")
    assert health.status_code == 503
    assert "the job store's disk was full" in health.json()["queue"]
    filler.unlink()
    assert _wait_for(lambda: client.get("/health/all").status_code == 200)
    assert client.post("/predict", content=photo, headers=png).json()["job_id"] is not None


def test_a_fast_model_whose_scores_are_not_finite_gets_a_typed_500_and_leaves_no_job(
    tiny_dir: Path, tmp_path: Path, open_app: Callable[[Settings], TestClient]
) -> None:
    """It was a 500 internal_error from deep in the cascade's statistics, which took NaN
    for a confidence."""
    nan = tiny_model(tmp_path / "nan", TinySpec(name="nan", size=32, nan_when_blue=True))
    told = {"fast_model": str(nan.parent)}
    client = open_app(Settings(**_settings(tiny_dir, tmp_path).model_dump() | told))
    blue = encode(solid((0, 0, 255)), "PNG")
    response = client.post("/predict", content=blue, headers={"Content-Type": "image/png"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert (error["code"], error["details"]) == ("invalid_model_output", {"model": "nan"})
    assert _post(client)  # a red image's scores are finite
    store = client.app.state.service.store  # type: ignore[attr-defined]
    assert client.portal.call(store.queue_depth) == 1  # the red one's: none for the blue one


def test_a_fast_model_that_cannot_classify_the_sample_photo_is_refused_at_start_up(
    tiny_dir: Path, tmp_path: Path
) -> None:
    always = {"mean": (1000.0, 0.0, 0.0)}  # red far under blue, whatever the image
    spec = TinySpec(name="nan", size=32, nan_when_blue=True, preprocess=always)
    nan = tiny_model(tmp_path / "nan", spec)
    told = {"fast_model": str(nan.parent)}
    app = create_app(Settings(**_settings(tiny_dir, tmp_path).model_dump() | told))
    with pytest.raises(ConfigurationError, match=r"not finite .* on the bundled sample photo"):
        TestClient(app).__enter__()
