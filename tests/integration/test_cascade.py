"""The cascade and live agreement, on the real models and real photos (issue 7).

With the default models, scikit-image's `chelsea` is a photo they disagree on (fast: tiger cat
at about 0.39; accurate: Egyptian cat), and `coffee` one they agree on with a confident fast
answer (espresso at about 0.95). bench/cascade.py prints both models' answers on every photo.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from bench.cascade import photo_dir
from tandem.api.app import create_app
from tandem.cascade import bucket_of
from tandem.jobs.records import Claim
from tandem.jobs.sqlite import SQLiteJobStore
from tandem.jobs.store import Completed
from tandem.predictions import Prediction
from tandem.settings import Settings
from tests.support import metric

pytestmark = pytest.mark.slow

CHELSEA = (photo_dir() / "chelsea.png").read_bytes()
COFFEE = (photo_dir() / "coffee.png").read_bytes()


@pytest.fixture
def make_client(model_dir: Path, tmp_path: Path, open_app: Any) -> Any:
    def make(**overrides: Any) -> TestClient:
        client: TestClient = open_app(Settings(data_dir=tmp_path, model_dir=model_dir, **overrides))
        return client

    return make


def post(client: TestClient, image: bytes, **params: Any) -> dict[str, Any]:
    response = client.post(
        "/predict", content=image, headers={"Content-Type": "image/png"}, params=params
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def finished(client: TestClient, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/job/{job_id}").json()
        if body["status"] == "done":
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not done in {timeout} s")


def test_always_sends_every_request_and_final_shows_the_change(make_client: Any) -> None:
    client = make_client()
    fast = post(client, CHELSEA)
    assert fast["cascade"] == {
        "policy": "always",
        "threshold": 0.8,
        "margin": None,
        "sent": True,
        "reason": None,
    }
    job = finished(client, fast["job_id"])
    assert job["fast"]["label"] == "tiger cat"
    assert job["accurate"]["label"] == "Egyptian cat"
    assert job["final"]["label"] == "Egyptian cat"
    assert job["final"]["source"] == "accurate"
    assert job["final"]["changed"] is True


def test_agreeing_models_leave_final_unchanged(make_client: Any) -> None:
    client = make_client()
    job = finished(client, post(client, COFFEE)["job_id"])
    assert job["final"]["label"] == job["fast"]["label"] == "espresso"
    assert job["final"]["changed"] is False


def test_when_unsure_skips_confident_requests_with_the_reason(make_client: Any) -> None:
    client = make_client()
    confident = post(client, COFFEE, policy="when_unsure", threshold=0.9)
    assert confident["job_id"] is None
    assert confident["job"] is None
    assert confident["fast"]["label"] == "espresso"
    assert confident["cascade"]["sent"] is False
    assert "confident" in confident["cascade"]["reason"]
    unsure = post(client, CHELSEA, policy="when_unsure", threshold=0.9)
    assert unsure["job_id"] is not None
    assert unsure["cascade"]["sent"] is True
    # A margin the confident answer does not reach sends it on after all.
    margined = post(client, COFFEE, policy="when_unsure", threshold=0.5, margin=0.99)
    assert margined["job_id"] is not None
    answers = client.get("/metrics").text
    assert metric(answers, 'tandem_fast_answers_total{job="skipped"}') == 1
    assert metric(answers, 'tandem_fast_answers_total{job="queued"}') == 2


def test_the_server_wide_policy_applies_and_a_request_overrides_it(make_client: Any) -> None:
    client = make_client(cascade_policy="when_unsure", cascade_threshold=0.9)
    assert post(client, COFFEE)["job_id"] is None
    assert post(client, COFFEE, policy="always")["job_id"] is not None
    assert post(client, COFFEE, threshold=0.99)["job_id"] is not None


@pytest.mark.parametrize(
    "params",
    [
        {"policy": "sometimes"},
        {"threshold": "1.5"},
        {"threshold": "high"},
        {"margin": "-0.1"},
        {"treshold": "0.9"},  # had been ignored, and the request run on the server's gate
    ],
)
def test_bad_policy_parameters_are_422_and_cost_nothing(
    make_client: Any, params: dict[str, str]
) -> None:
    client = make_client()
    response = client.post(
        "/predict", content=COFFEE, headers={"Content-Type": "image/png"}, params=params
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    # Named as FastAPI names a bad query parameter, though /predict parses its own.
    assert [problem["loc"] for problem in error["details"]["problems"]] == [["query", *params]]
    assert client.get("/stats").json()["requests"] == 0


def test_an_unknown_parameter_is_named_with_those_known(make_client: Any) -> None:
    response = make_client().get("/predict/test", params={"polcy": "never"})
    assert response.status_code == 422
    assert response.json()["error"]["message"] == (
        "query.polcy: unknown parameter; known: policy, threshold, margin"
    )


def test_stats_count_agreement_by_bucket_and_survive_a_restart(make_client: Any) -> None:
    client = make_client()
    chelsea = finished(client, post(client, CHELSEA)["job_id"])
    coffee = finished(client, post(client, COFFEE)["job_id"])
    post(client, COFFEE, policy="when_unsure", threshold=0.9)  # answered, not judged
    stats = client.get("/stats").json()
    assert stats["requests"] == 3
    assert stats["judged"] == 2
    assert stats["agreement"] == 0.5
    assert stats["jobs"]["done"] == 2
    low = stats["buckets"][bucket_of(chelsea["fast"]["top_k"][0]["probability"])]
    high = stats["buckets"][bucket_of(coffee["fast"]["top_k"][0]["probability"])]
    assert (low["requests"], low["judged"], low["agreement"]) == (1, 1, 0.0)
    assert low["top5_agreement"] == 1.0  # tiger cat is in the accurate top-5
    assert (high["requests"], high["judged"], high["agreement"]) == (2, 1, 1.0)
    # At 0.9 the chelsea request is sent and both coffees are kept: 1/3 sent; the kept ones'
    # bucket agreed every time it was judged, so the final answer always matches `always`.
    at_09 = next(t for t in stats["thresholds"] if t["threshold"] == 0.9)
    assert at_09["sent_share"] == pytest.approx(1 / 3)
    assert at_09["final_agreement"] == 1.0
    client.__exit__(None, None, None)
    again = make_client()  # the same data directory
    assert again.get("/stats").json()["judged"] == 2
    assert again.get("/stats").json()["requests"] == 3


class _LateFastAnswers(SQLiteJobStore):
    """Holds each fast answer back until the worker has stored the job's result, as happens
    now and then when a worker is quicker than the proxy."""

    async def attach_fast(self, job_id: str, fast: Prediction) -> Prediction | None:
        deadline = time.monotonic() + 60
        while (job := await self.get(job_id)) is None or job.result is None:
            assert time.monotonic() < deadline, "the worker never stored a result"
            await asyncio.sleep(0.01)
        self.reported = await super().attach_fast(job_id, fast)
        return self.reported


class _EarlyClaims(SQLiteJobStore):
    """The worker reads each job before its fast answer is added, and stores its result
    after: the other order in which the two answers meet."""

    async def claim(
        self, worker_id: str, limit: int, wait_s: float, until: asyncio.Event | None = None
    ) -> list[Claim]:
        claims = await super().claim(worker_id, limit, wait_s, until)
        return [replace(c, job=replace(c.job, fast=None)) for c in claims]

    async def complete_many(self, results: Any, tallies: Any = None) -> Completed:
        deadline = time.monotonic() + 60
        for job_id in results:
            while (job := await self.get(job_id)) is None or job.fast is None:
                assert time.monotonic() < deadline, "the proxy never added the fast answer"
                await asyncio.sleep(0.01)
        self.completed = await super().complete_many(results, tallies)
        return self.completed


def test_a_job_is_judged_once_whichever_answer_is_stored_last(
    model_dir: Path, tmp_path: Path
) -> None:
    """The job is stored while the fast model runs, and the worker may take it before the
    fast answer is added, or even answer it first: either way it is judged exactly once."""
    settings = Settings(data_dir=tmp_path, model_dir=model_dir)
    late = _LateFastAnswers(tmp_path / "late.db")
    with TestClient(create_app(settings, store=late)) as client:
        finished(client, post(client, CHELSEA)["job_id"])
        assert late.reported is not None  # the proxy, second, was told the result
        assert client.get("/stats").json()["judged"] == 1
    early = _EarlyClaims(tmp_path / "early.db")
    with TestClient(create_app(settings, store=early)) as client:
        job_id = post(client, CHELSEA)["job_id"]
        finished(client, job_id)
        assert early.completed.untallied == {job_id}  # the worker, second, owed the judgement
        stats = client.get("/stats").json()
        assert stats["judged"] == 1
        assert stats["buckets"][bucket_of(0.39)]["judged"] == 1  # judged on its fast answer
