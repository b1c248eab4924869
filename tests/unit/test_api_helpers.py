from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tandem.api import routes
from tandem.api.bodies import decode_base64
from tandem.api.paths import PassedOnPrefix, route_path
from tandem.errors import ConfigurationError, InvalidBase64, ModelNotFound
from tandem.jobs.records import Job, JobStatus
from tandem.runtime.assets import imagenet_labels
from tandem.runtime.manifest import model_name, read_manifest, resolve_manifest_path
from tests.support import TinySpec, tiny_model

PAYLOAD = bytes(range(256)) * 3


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(PAYLOAD).decode(),
        "\n".join(base64.b64encode(PAYLOAD).decode()[i : i + 76] for i in range(0, 1024, 76)),
        "data:image/png;base64," + base64.b64encode(PAYLOAD).decode(),
    ],
)
def test_base64_in_the_forms_clients_send(text: str) -> None:
    assert decode_base64(text) == PAYLOAD


@given(st.binary(max_size=2048), st.sampled_from([0, 4, 76]))
def test_base64_decodes_what_the_standard_library_encodes(data: bytes, wrap: int) -> None:
    text = base64.b64encode(data).decode()
    if wrap:
        text = "\n".join(text[i : i + wrap] for i in range(0, len(text), wrap))
    assert decode_base64(text) == data


@pytest.mark.parametrize("text", ["abc", "####", "YWJj ZA=", "YWJjZA==YWJj", "YWJj\u00e9"])
def test_invalid_base64_is_refused(text: str) -> None:
    with pytest.raises(InvalidBase64):
        decode_base64(text)


def test_model_references_resolve(tmp_path: Path) -> None:
    manifest = tiny_model(tmp_path / "tiny", TinySpec(name="tiny", size=8))
    assert resolve_manifest_path(str(manifest), tmp_path) == manifest
    assert resolve_manifest_path(str(manifest.parent), tmp_path) == manifest
    assert resolve_manifest_path("tiny", tmp_path) == manifest
    assert model_name("tiny", tmp_path) == "tiny"
    assert model_name("elsewhere", tmp_path) == "elsewhere"
    with pytest.raises(ModelNotFound):
        resolve_manifest_path("./missing", tmp_path)


def test_a_model_file_named_for_its_manifest_is_said_to_be_one(tmp_path: Path) -> None:
    """Its message had been that there was no such manifest or directory, beside the file."""
    manifest = tiny_model(tmp_path / "tiny", TinySpec(name="tiny", size=8))
    onnx_file = manifest.parent / "tiny.onnx"
    with pytest.raises(ModelNotFound, match="is a model file, not its manifest: name "):
        resolve_manifest_path(str(onnx_file), tmp_path)


def test_a_manifest_with_a_background_outside_its_labels_is_refused(tmp_path: Path) -> None:
    manifest = tiny_model(tmp_path / "m", TinySpec(name="m", size=8))
    text = manifest.read_text().replace('"background_index": null', '"background_index": 99')
    manifest.write_text(text)
    with pytest.raises(ConfigurationError, match="background_index"):
        read_manifest(manifest)


def test_the_bundled_labels_are_imagenet_1k() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert (labels[0], labels[281], labels[967]) == ("tench", "tabby", "espresso")


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


async def test_an_event_stream_keeps_alive_only_after_a_quiet_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Wake-ups every 0.5 s (SQLite's re-reads) each sent a comment; 15 s was meant."""
    clock = _Clock()
    monkeypatch.setattr(routes, "time", clock)
    queued = Job(id="a" * 32, status=JobStatus.QUEUED, created_at=0.0, updated_at=0.0)

    async def states() -> AsyncIterator[Job]:
        yield queued
        for _ in range(100):  # 50 s of unchanged wake-ups
            clock.now += 0.5
            yield queued
        yield replace(queued, status=JobStatus.CANCELLED, updated_at=clock.now)

    frames = [frame async for frame in routes._job_frames(states(), keepalive_s=15.0)]
    kinds = [frame.split(b"\n", 1)[0] for frame in frames]
    assert kinds == [b"event: queued"] + [b": keep-alive"] * 3 + [b"event: cancelled"]


@pytest.mark.parametrize(
    ("path", "root_path", "route"),
    [
        ("/health", "", "/health"),
        ("/tandem/health", "/tandem", "/health"),  # uvicorn put the root path in front
        ("/tandem", "/tandem", ""),
        ("/health", "/tandem", "/health"),  # a server that left the path as it came
        ("/tandemx/health", "/tandem", "/tandemx/health"),  # not under it: a name that shares
    ],
)
def test_a_route_path_is_the_path_below_the_root_path(
    path: str, root_path: str, route: str
) -> None:
    assert route_path({"path": path, "root_path": root_path}) == route


@pytest.mark.parametrize(
    ("path", "root_path", "served"),
    [
        ("/tandem/tandem/job/x", "/tandem", "/tandem/job/x"),  # the proxy passed /tandem on
        ("/tandem/tandem", "/tandem", "/tandem"),
        ("/tandem/job/x", "/tandem", "/tandem/job/x"),  # the proxy stripped it
        ("/tandem/tandemx/job/x", "/tandem", "/tandem/tandemx/job/x"),  # a name that shares
        ("/job/x", "", "/job/x"),
    ],
)
async def test_a_root_path_passed_on_by_the_proxy_is_served_once(
    path: str, root_path: str, served: str
) -> None:
    seen: list[tuple[str, bytes]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["path"], scope["raw_path"]))

    scope = {"type": "http", "path": path, "raw_path": path.encode(), "root_path": root_path}
    await PassedOnPrefix(app)(scope, None, None)  # type: ignore[arg-type]
    assert seen == [(served, served.encode())]
