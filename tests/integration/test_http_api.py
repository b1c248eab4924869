"""The seed's HTTP API, driven over real HTTP against `tandem serve` with the real models."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as photos

from tandem import __version__
from tandem.jobs.records import new_job_id
from tandem.runtime.manifest import MANIFEST_NAME, read_manifest
from tests.support import (
    ServerProcess,
    b64,
    clean_env,
    encode,
    metric,
    tiny_env,
    wait_for_job,
)

pytestmark = pytest.mark.slow

CATS = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}
JOB_ID_LENGTH = 32


def post_image(server: ServerProcess, data: bytes) -> dict:
    with server.client() as client:
        response = client.post("/predict", json={"image_data": b64(data)})
    assert response.status_code == 200, response.text
    return response.json()


def test_health(real_server: ServerProcess) -> None:
    with real_server.client() as client:
        assert client.get("/health").json() == {"health": "ok"}
        response = client.get("/health/all")
    assert response.status_code == 200
    assert response.json() == {
        "efficientnet_lite0": "ok",
        "efficientnet_lite2": "ok",
        "queue": "ok",
    }


def test_metadata_describes_the_models(real_server: ServerProcess, model_dir: Path) -> None:
    with real_server.client() as client:
        body = client.get("/metadata").json()
    assert body["data_type"] == "str"
    assert body["prediction_structure"] == "(1,1000)"
    assert body["models"]["fast"]["name"] == "efficientnet_lite0"
    assert body["models"]["fast"]["input_size"] == 224
    assert body["models"]["accurate"]["name"] == "efficientnet_lite2"
    assert body["version"] == __version__
    manifest = read_manifest(model_dir / "efficientnet_lite0" / MANIFEST_NAME)
    assert body["models"]["fast"]["sha256"] == manifest.sha256


def test_predict_test_answers_with_the_bundled_cat(real_server: ServerProcess) -> None:
    with real_server.client() as client:
        body = client.get("/predict/test").json()
        assert body["efficientnet_lite0"] in CATS
        job = wait_for_job(client, body["job_id"])
    assert job["status"] == "done"
    assert job[body["job_id"]]["prediction"] in CATS


@pytest.mark.parametrize(
    ("photo", "expected"),
    [("chelsea", CATS), ("coffee", {"espresso"})],
)
def test_real_photos_get_sensible_labels_from_both_models(
    real_server: ServerProcess, photo: str, expected: set[str]
) -> None:
    data = encode(getattr(photos, photo)(), "JPEG", quality=92)
    body = post_image(real_server, data)
    assert body["efficientnet_lite0"] in expected
    assert body["fast"]["label"] == body["efficientnet_lite0"]
    assert len(body["fast"]["top_k"]) == 5
    probabilities = [item["probability"] for item in body["fast"]["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True)
    assert 0 < sum(probabilities) <= 1.0001
    with real_server.client() as client:
        job = wait_for_job(client, body["job_id"])
    assert job["status"] == "done"
    assert job[body["job_id"]] == {"prediction": job["accurate"]["label"]}
    assert job["accurate"]["label"] in expected
    assert job["accurate"]["model"] == "efficientnet_lite2"
    assert job["fast"]["label"] == body["efficientnet_lite0"]


def test_predict_response_carries_a_durable_128_bit_job(real_server: ServerProcess) -> None:
    body = post_image(real_server, encode(photos.astronaut()))
    job_id = body["job_id"]
    assert len(job_id) == JOB_ID_LENGTH
    int(job_id, 16)
    assert body["job"] == {"id": job_id, "status": "queued", "url": f"/job/{job_id}"}
    assert body["accurate_model"] == "efficientnet_lite2"
    assert body["timings"]["total_ms"] >= body["timings"]["fast_ms"] > 0
    with real_server.client() as client:
        job = client.get(f"/job/{job_id}").json()
    assert job["status"] in ("queued", "running", "done")
    if job["status"] != "done":
        assert job[job_id] == {"prediction": ""}


def test_original_curl_body_with_wrapped_base64_works(real_server: ServerProcess) -> None:
    # `base64 file` wraps at 76 columns; clients of the original sent that as is.
    data = encode(photos.chelsea())
    wrapped = "\n".join(b64(data)[i : i + 76] for i in range(0, len(b64(data)), 76))
    with real_server.client() as client:
        response = client.post("/predict", json={"image_data": wrapped})
        as_data_url = client.post(
            "/predict", json={"image_data": "data:image/jpeg;base64," + b64(data)}
        )
    assert response.status_code == 200
    assert as_data_url.status_code == 200


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("LA", "PNG")],
)
def test_other_colour_modes_are_converted_and_classified(
    real_server: ServerProcess, mode: str, fmt: str
) -> None:
    cat = Image.fromarray(photos.chelsea())
    if mode == "I;16":
        image = Image.fromarray(np.asarray(cat.convert("L"), dtype=np.uint16) * 257)
    else:
        image = cat.convert(mode)
    body = post_image(real_server, encode(image, fmt))
    assert body["fast"]["label"]
    if mode in ("RGBA", "P", "CMYK"):
        assert body["efficientnet_lite0"] in CATS


def _truncated_jpeg() -> bytes:
    data = encode(photos.chelsea())
    return data[: len(data) // 2]


def _bomb_png() -> bytes:
    # A tiny PNG whose header claims 30000x30000 pixels: it must be refused before decoding.
    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_BODIES = [
    ("not json", b"{not json", 400, "invalid_json"),
    ("json array", b"[1, 2]", 422, "validation_error"),
    ("missing field", b"{}", 422, "validation_error"),
    ("wrong type", b'{"image_data": 42}', 422, "validation_error"),
    ("bad base64", b'{"image_data": "%%%not base64%%%"}', 422, "invalid_base64"),
    ("empty image", b'{"image_data": ""}', 422, "invalid_image"),
    ("text, not an image", b'{"image_data": "aGVsbG8gd29ybGQ="}', 422, "invalid_image"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "code"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES]
)
def test_bad_requests_get_typed_errors_and_cost_no_job(
    real_server: ServerProcess, case: str, body: bytes, status: int, code: str
) -> None:
    with real_server.client() as client:
        response = client.post(
            "/predict", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert "job_id" not in response.json()


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("/predict/test?policy=always&policy=when_unsure&threshold=0.5", "policy"),
        (f"/job/{new_job_id()}?wait=0.1&_=1&wait=30", "wait"),
    ],
)
def test_a_parameter_given_twice_is_refused_not_picked(
    real_server: ServerProcess, query: str, name: str
) -> None:
    """`policy=always&policy=when_unsure` had been served with one of the two, silently, as
    had a long-poll with two `wait`s (the last)."""
    with real_server.client() as client:
        response = client.get(query)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["message"] == f"query.{name}: given 2 times; give it once"
    assert [p["type"] for p in error["details"]["problems"]] == ["repeated_parameter"]


def test_a_job_read_lets_a_cache_buster_through_even_twice(real_server: ServerProcess) -> None:
    """A browser's or a library's `_=<time>` is no parameter of ours: the read goes on."""
    with real_server.client() as client:
        response = client.get(f"/job/{new_job_id()}?_=1&_=2&wait=0")
    assert response.json()["error"]["code"] == "job_not_found"


def test_a_body_of_the_wrong_shape_is_named_as_the_body(real_server: ServerProcess) -> None:
    """Its problem has no location: the message had begun ": Input should be an object"."""
    with real_server.client() as client:
        response = client.post("/predict", json=[1, 2])
    assert response.json()["error"]["message"] == "body: Input should be an object"


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/job/0123456789abcdef0123456789abcdef?wait=nan", "query.wait"),
        ("/job/0123456789abcdef0123456789abcdef?wait=inf", "query.wait"),
        ("/predict/test?threshold=nan", "query.threshold"),
        ("/predict/test?margin=-inf", "query.margin"),
    ],
)
def test_a_number_that_is_not_finite_is_named_as_such(
    real_server: ServerProcess, path: str, field: str
) -> None:
    """`wait=nan` had been answered "Input should be less than or equal to 60"."""
    with real_server.client() as client:
        response = client.get(path)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"] == f"{field}: Input should be a finite number"


@pytest.mark.parametrize(
    ("case", "image", "status", "code"),
    [
        ("truncated jpeg", _truncated_jpeg(), 422, "invalid_image"),
        ("decompression bomb", _bomb_png(), 413, "image_too_large"),
    ],
)
def test_broken_images_get_typed_errors(
    real_server: ServerProcess, case: str, image: bytes, status: int, code: str
) -> None:
    with real_server.client() as client:
        response = client.post("/predict", json={"image_data": b64(image)})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


@pytest.mark.parametrize(
    "job_id",
    ["0" * 32, "6195b8", "tandem:jobs", "X" * 32, "health", "A" * 300, "0" * 33],
)
def test_unknown_or_malformed_job_ids_are_404(real_server: ServerProcess, job_id: str) -> None:
    with real_server.client() as client:
        response = client.get(f"/job/{job_id}")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "job_not_found"
    # A well-formed id may have expired; a malformed one is told the form ids take.
    malformed = job_id != "0" * 32
    assert ("32 lowercase hexadecimal digits" in error["message"]) is malformed
    assert ("expired" in error["message"]) is not malformed


def test_every_error_has_the_same_shape(real_server: ServerProcess) -> None:
    with real_server.client() as client:
        responses = [
            client.get("/no/such/route"),
            client.delete("/health"),
            client.get("/job/nope"),
            client.post("/predict", content=b"x", headers={"content-type": "application/json"}),
        ]
    assert [r.status_code for r in responses] == [404, 405, 404, 400]
    for response in responses:
        assert set(response.json()) == {"error"}
        assert set(response.json()["error"]) == {"code", "message", "request_id", "details"}


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/job/0123", "DELETE, GET, HEAD"),
        ("/health", "GET, HEAD"),
        ("/predict", "POST"),
        ("/docs", "GET, HEAD"),
        ("/predict/test", "GET"),
    ],
)
def test_a_405_names_every_method_the_path_allows(
    real_server: ServerProcess, path: str, allowed: str
) -> None:
    """With routes included from a router, FastAPI 0.165 holds them behind one entry of its
    own: the Allow header, as each 405 must carry it (RFC 9110), came out empty."""
    with real_server.client() as client:
        response = client.put(path)
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == allowed


@pytest.mark.parametrize("path", ["/health", "/health/all", "/", "/metadata", "/metrics"])
def test_head_answers_as_get_would_without_the_body(real_server: ServerProcess, path: str) -> None:
    """It was 405 on every route but /openapi.json: FastAPI's routes take GET alone."""
    with real_server.client() as client:
        got = client.get(path)
        head = client.head(path)
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


def test_head_makes_no_job_where_get_does(model_dir: Path, tmp_path: Path) -> None:
    """HEAD is safe (RFC 9110). Served as GET, HEAD /predict/test had queued a job, its
    answer dropped: for each uptime check or link checker that sent it."""
    env = clean_env(model_dir=str(model_dir), data_dir=str(tmp_path))
    server = ServerProcess(tmp_path / "server.log", env, "--no-worker").start()  # jobs stay
    try:
        with server.client() as client:
            head = client.head("/predict/test")
            queued_after_head = metric(client.get("/metrics").text, "tandem_queue_length")
            assert client.get("/predict/test").status_code == 200
            queued_after_get = metric(client.get("/metrics").text, "tandem_queue_length")
    finally:
        server.stop()
    assert head.status_code == 405
    assert head.headers["allow"] == "GET"
    assert head.content == b""
    assert (queued_after_head, queued_after_get) == (0, 1)


@pytest.mark.parametrize("passed_on", ["", "/tandem"], ids=["stripped", "passed-on"])
def test_behind_a_reverse_proxy_s_path_everything_keeps_its_place(
    tiny_dir: Path, tmp_path: Path, passed_on: str
) -> None:
    """With TANDEM_ROOT_PATH, a request that the proxy passed on with or without its path
    (/tandem) meets the guards and routes of the same request from the root, and what the
    server names (a job's url, the docs' schema) is under the path, where the client
    reaches it."""
    env = tiny_env(tiny_dir, tmp_path, root_path="/tandem", api_keys="k")
    server = ServerProcess(tmp_path / "server.log", env, "--no-worker").start()
    key = {"X-API-Key": "k"}
    try:
        with server.client() as client:
            client.base_url = client.base_url.join(passed_on)
            open_health = client.get("/health")  # open without a key, as from the root
            refused = client.get("/predict/test")
            head = client.head("/predict/test", headers=key)  # no job, as from the root
            queued = metric(client.get("/metrics", headers=key).text, "tandem_queue_length")
            answer = client.get("/predict/test", headers=key).json()
            job = client.get(f"/job/{answer['job_id']}", headers=key)
            docs = client.get("/docs")
    finally:
        server.stop()
    assert open_health.status_code == 200
    assert refused.status_code == 401
    assert (head.status_code, queued) == (405, 0)
    assert answer["job"]["url"] == f"/tandem/job/{answer['job_id']}"
    assert job.status_code == 200
    assert "'/tandem/openapi.json'" in docs.text


@pytest.mark.parametrize("path", ["/health", "/", "/job/nope", "/metrics", "/docs"])
def test_every_response_forbids_sniffing_its_type_once(
    real_server: ServerProcess, path: str
) -> None:
    """Only the page said so: a browser could take a JSON body for something else."""
    with real_server.client() as client:
        response = client.get(path)
    assert response.headers.get_list("x-content-type-options") == ["nosniff"]
    assert "server" not in response.headers  # `uvicorn` had told scanners what to try


def test_a_request_id_from_the_client_is_kept(real_server: ServerProcess) -> None:
    with real_server.client() as client:
        response = client.get("/job/nope", headers={"x-request-id": "trace-123"})
    assert response.headers["x-request-id"] == "trace-123"
    assert response.json()["error"]["request_id"] == "trace-123"


def test_openapi_documents_every_route(real_server: ServerProcess) -> None:
    with real_server.client() as client:
        spec = client.get("/openapi.json").json()
        docs = client.get("/docs")
    assert docs.status_code == 200
    assert {
        "/health",
        "/health/all",
        "/metadata",
        "/predict",
        "/predict/test",
        "/job/{job_id}",
    } <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"PredictResponse", "JobResponse", "ErrorBody"} <= set(schemas)
    bodies = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert bodies["application/json"]["schema"]["required"] == ["image_data"]
    assert {"image/*", "application/octet-stream"} <= set(bodies)
    assert bodies["multipart/form-data"]["schema"]["required"] == ["image"]


def test_raw_and_form_image_bodies_are_accepted(real_server: ServerProcess) -> None:
    data = encode(photos.chelsea())
    with real_server.client() as client:
        raw = client.post("/predict", content=data, headers={"content-type": "image/jpeg"})
        octets = client.post(
            "/predict", content=data, headers={"content-type": "application/octet-stream"}
        )
        form = client.post("/predict", files={"image": ("chelsea.jpg", data, "image/jpeg")})
        text = client.post("/predict", content=b"hello", headers={"content-type": "text/plain"})
        not_image = client.post("/predict", content=b"hello", headers={"content-type": "image/png"})
    assert raw.status_code == octets.status_code == 200
    assert raw.json()["efficientnet_lite0"] in CATS
    assert form.status_code == 200, form.text
    assert form.json()["fast"]["top_k"] == raw.json()["fast"]["top_k"]
    assert text.status_code == 415
    assert text.json()["error"]["code"] == "unsupported_media_type"
    assert not_image.status_code == 422
    assert not_image.json()["error"]["code"] == "invalid_image"


@pytest.mark.parametrize(
    ("photo", "changed"),
    [
        ("chelsea", True),
        ("coffee", False),
    ],  # Lite0 says tiger cat, Lite2 Egyptian cat; both espresso
)
def test_final_gives_the_best_known_label(
    real_server: ServerProcess, photo: str, changed: bool
) -> None:
    body = post_image(real_server, encode(getattr(photos, photo)(), "JPEG", quality=92))
    with real_server.client() as client:
        job = wait_for_job(client, body["job_id"])
    final = job["final"]
    assert final["source"] == "accurate"
    assert final["label"] == job["accurate"]["label"]
    assert final["model"] == "efficientnet_lite2"
    assert final["changed"] is changed
    assert (final["label"] != body["efficientnet_lite0"]) is changed
