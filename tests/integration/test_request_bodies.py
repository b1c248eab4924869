"""The bodies POST /predict takes, on the app in-process: each gets the same answer, and a bad
one a typed error that leaves no job behind."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tandem.settings import Settings
from tests.support import b64, encode, metric, solid

PNG = encode(solid((0, 0, 255)), "PNG")
JSON = "application/json"
# A form whose field `image` is text, not a file: the shape `curl -F "image=<photo.jpg"` sends.
TEXT_ONLY = b'--zz\r\nContent-Disposition: form-data; name="image"\r\n\r\nnot a file\r\n--zz--\r\n'


@pytest.fixture
def client(tiny_dir: Path, tmp_path: Path, open_app: Any) -> TestClient:
    settings = Settings(
        data_dir=tmp_path,
        model_dir=tiny_dir,
        fast_model="tiny_fast",
        accurate_model="tiny_accurate",
        embedded_worker=False,  # every job stays queued, to be counted
    )
    started: TestClient = open_app(settings)
    return started


def _queued(client: TestClient) -> float:
    return metric(client.get("/metrics").text, "tandem_queue_length")


def test_every_body_gets_the_same_answer_and_a_job(client: TestClient) -> None:
    answers = [
        client.post("/predict", json={"image_data": b64(PNG)}),
        client.post("/predict", content=PNG, headers={"content-type": "image/png"}),
        client.post("/predict", files={"image": ("blue.png", PNG, "image/png")}),
        # The form's only file, whatever its field's name, and text fields beside it.
        client.post("/predict", files={"file": ("blue.png", PNG)}, data={"note": "hi"}),
    ]
    assert [a.status_code for a in answers] == [200] * 4
    assert len({a.json()["fast"]["label"] for a in answers}) == 1
    assert len({a.json()["job_id"] for a in answers}) == 4
    assert _queued(client) == 4


def test_a_body_sent_without_a_type_is_taken_for_what_it_is(client: TestClient) -> None:
    """httpx and requests send bytes without a Content-Type; read as JSON, an image had got
    400 'not valid JSON'. A body that begins with `{` is still the original API's JSON."""
    typed = client.post("/predict", content=PNG, headers={"content-type": "image/png"}).json()
    document = json.dumps({"image_data": b64(PNG)}).encode()
    untyped = [client.post("/predict", content=body) for body in (PNG, b"\r\n " + document)]
    assert all("content-type" not in answer.request.headers for answer in untyped)
    assert [answer.status_code for answer in untyped] == [200, 200]
    assert all(answer.json()["fast"]["top_k"] == typed["fast"]["top_k"] for answer in untyped)
    garbage, broken = (client.post("/predict", content=b) for b in (b"not an image", b"{not"))
    assert (garbage.status_code, garbage.json()["error"]["code"]) == (422, "invalid_image")
    assert (broken.status_code, broken.json()["error"]["code"]) == (400, "invalid_json")
    assert _queued(client) == 3


def test_a_json_body_may_begin_with_a_byte_order_mark(client: TestClient) -> None:
    """RFC 8259 lets a parser ignore it, and Windows tools write it: it got 400 invalid_json."""
    plain = client.post("/predict", json={"image_data": b64(PNG)}).json()
    document = b"\xef\xbb\xbf" + json.dumps({"image_data": b64(PNG)}).encode()
    typed = client.post("/predict", content=document, headers={"content-type": JSON})
    untyped = client.post("/predict", content=document)
    assert [typed.status_code, untyped.status_code] == [200, 200]
    assert (
        typed.json()["fast"]["top_k"] == untyped.json()["fast"]["top_k"] == plain["fast"]["top_k"]
    )
    assert _queued(client) == 3


def test_the_field_named_image_is_the_one_taken(client: TestClient) -> None:
    red = encode(solid((255, 0, 0)), "PNG")
    only_red = client.post("/predict", files={"image": ("red.png", red)}).json()
    both = client.post(
        "/predict", files=[("thumbnail", ("blue.png", PNG)), ("image", ("red.png", red))]
    ).json()
    assert both["fast"]["top_k"] == only_red["fast"]["top_k"]


@pytest.mark.parametrize(
    "sent",
    [
        {"json": {"image_data": b64(PNG), "callback_url": "http://example.com/hook"}},
        {"files": {"image": ("a.png", PNG)}, "data": {"policy": "never"}},
    ],
    ids=["json", "form"],
)
def test_an_option_sent_in_the_body_is_refused_with_where_it_goes(
    client: TestClient, sent: dict[str, Any]
) -> None:
    """The options are query parameters: in the body they had been ignored, and a callback that
    the client waited for was never called."""
    response = client.post("/predict", **sent)
    assert response.status_code == 422, response.text
    [problem] = response.json()["error"]["details"]["problems"]
    name = problem["loc"][1]
    assert problem["loc"] == ["body", name]
    assert f"POST /predict?{name}=" in problem["msg"]
    assert _queued(client) == 0


def test_other_fields_beside_the_image_are_ignored(client: TestClient) -> None:
    sent = client.post("/predict", json={"image_data": b64(PNG), "filename": "a.png"})
    assert sent.status_code == 200, sent.text
    form = client.post("/predict", files={"image": ("a.png", PNG)}, data={"note": "hi"})
    assert form.status_code == 200, form.text


def _raw(body: bytes, content_type: str) -> dict[str, Any]:
    return {"content": body, "headers": {"content-type": content_type}}


FORM = "multipart/form-data; boundary=zz"
MANY_FIELDS = {f"f{i}": "x" for i in range(40)}
FORM_ERRORS = [
    # name, what the request sends (httpx's arguments), status, code
    ("no file", _raw(TEXT_ONLY, FORM), 422, "validation_error"),
    ("two files, neither image", {"files": [("a", ("a.png", PNG)), ("b", ("b.png", PNG))]}, 422,
     "validation_error"),
    ("two files named image", {"files": [("image", ("a.png", PNG)), ("image", ("b.png", PNG))]},
     422, "validation_error"),
    ("not an image", {"files": {"image": ("a.png", b"hello")}}, 422, "invalid_image"),
    ("empty file", {"files": {"image": ("a.png", b"")}}, 422, "invalid_image"),
    ("too many fields", {"files": {"image": ("a.png", PNG)}, "data": MANY_FIELDS}, 400,
     "invalid_multipart"),
    ("no boundary", _raw(b"x", "multipart/form-data"), 400, "invalid_multipart"),
    ("not multipart", _raw(PNG, FORM), 400, "invalid_multipart"),
    ("another multipart type", _raw(TEXT_ONLY, "multipart/mixed; boundary=zz"), 415,
     "unsupported_media_type"),
    ("a urlencoded form", {"data": {"image": "x"}}, 415, "unsupported_media_type"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("sent", "status", "code"),
    [case[1:] for case in FORM_ERRORS],
    ids=[case[0] for case in FORM_ERRORS],
)
def test_a_bad_form_gets_a_typed_error_and_costs_no_job(
    client: TestClient, sent: dict[str, Any], status: int, code: str
) -> None:
    response = client.post("/predict", **sent)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    if code == "validation_error":
        assert error["details"]["problems"][0]["loc"] == ["body", "image"]
    assert _queued(client) == 0
    assert client.post("/predict", files={"image": ("a.png", PNG)}).status_code == 200


@pytest.mark.parametrize("kind", ["raw", "json", "form"])
def test_a_compressed_body_gets_415_not_a_guess(client: TestClient, kind: str) -> None:
    """Content-Encoding was ignored: a gzipped PNG was read as a broken image, and a body that
    only claimed to be gzipped was classified as it stood."""
    sent = {
        "raw": _raw(gzip.compress(PNG), "image/png"),
        "json": _raw(gzip.compress(json.dumps({"image_data": b64(PNG)}).encode()), JSON),
        "form": {"files": {"image": ("a.png", PNG)}},
    }[kind]
    headers = {**sent.pop("headers", {}), "content-encoding": "gzip"}
    response = client.post("/predict", headers=headers, **sent)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert (error["code"], error["details"]) == (
        "unsupported_media_type",
        {"content_encoding": "gzip"},
    )
    assert _queued(client) == 0
    identity = client.post(
        "/predict", files={"image": ("a.png", PNG)}, headers={"content-encoding": "identity"}
    )
    assert identity.status_code == 200
