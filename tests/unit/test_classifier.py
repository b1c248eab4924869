"""The models' threads: a call alone gets every core, calls side by side share them, and
threads wait for work as the model's role needs."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest
from onnx import TensorProto
from PIL import Image

from tandem.errors import ConfigurationError
from tandem.runtime.classifier import Classifier, Spin, ThreadPlan, check_model
from tandem.runtime.placement import AFFINITIES
from tests.support import TinySpec, record_runs, tiny_model

RED = Image.new("RGB", (8, 8), (255, 0, 0))


def test_solo_calls_run_on_the_session_with_more_threads(tmp_path: Path) -> None:
    manifest = tiny_model(tmp_path, TinySpec(name="tiny", size=8))
    classifier = Classifier.from_manifest(manifest, ThreadPlan(threads=1, solo=2))
    runs: list[str] = []
    record_runs(classifier._solo, "solo", runs)
    record_runs(classifier._session, "shared", runs)
    alone = classifier.predict([RED], 1, solo=True)[0]
    beside = classifier.predict([RED], 1)[0]
    assert runs == ["solo", "shared"]
    assert alone.label == beside.label == classifier.manifest.labels[1]  # red votes for 1


def test_without_more_solo_threads_there_is_one_session(tmp_path: Path) -> None:
    manifest = tiny_model(tmp_path, TinySpec(name="tiny", size=8))
    assert Classifier.from_manifest(manifest, ThreadPlan(threads=2, solo=2))._solo is None
    assert Classifier.from_manifest(manifest, ThreadPlan(threads=0, solo=2))._solo is None
    single = Classifier.from_manifest(manifest, ThreadPlan(threads=1))
    assert single.predict([RED], 1, solo=True)[0].label == single.manifest.labels[1]


def _config(session: ort.InferenceSession, key: str) -> str | None:
    try:
        return str(session.get_session_options().get_session_config_entry(key))
    except RuntimeError:  # ORT's answer for a key never set: its default holds
        return None


@pytest.mark.parametrize(
    ("spin", "allow_spinning", "stop_after_run"),
    [(Spin.NEVER, "0", None), (Spin.IN_RUN, None, "1"), (Spin.ALWAYS, None, None)],
)
def test_each_way_of_spinning_reaches_both_sessions(
    tmp_path: Path, spin: Spin, allow_spinning: str | None, stop_after_run: str | None
) -> None:
    manifest = tiny_model(tmp_path, TinySpec(name="tiny", size=8))
    classifier = Classifier.from_manifest(manifest, ThreadPlan(1, spin, solo=2))
    assert classifier._solo is not None
    for session in (classifier._session, classifier._solo):
        assert _config(session, "session.intra_op.allow_spinning") == allow_spinning
        assert _config(session, "session.force_spinning_stop") == stop_after_run


CPUS = sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(CPUS) < 2, reason="placing two threads takes two CPUs")
def test_a_pinned_solo_call_runs_each_thread_on_a_cpu_of_its_own(tmp_path: Path) -> None:
    manifest = tiny_model(tmp_path, TinySpec(name="tiny", size=8))
    every = len(CPUS)
    classifier = Classifier.from_manifest(
        manifest, ThreadPlan(threads=1, solo=every, pin_solo=True)
    )
    assert classifier._solo is not None
    # The pool's threads on the first CPUs, fixed when the session opened (counted from 1).
    assert _config(classifier._solo, AFFINITIES) == ";".join(str(cpu + 1) for cpu in CPUS[:-1])
    assert _config(classifier._session, AFFINITIES) is None  # calls side by side: not pinned
    seen: list[set[int]] = []
    for session in (classifier._solo, classifier._session):
        _record_affinity(session, seen)
    classifier.predict([RED], 1, solo=True)
    classifier.predict([RED], 1)
    # The caller on the last CPU for the solo run only, and free again after it.
    assert seen == [{CPUS[-1]}, set(CPUS)]
    assert os.sched_getaffinity(0) == set(CPUS)


def test_unpinned_solo_calls_are_left_to_the_scheduler(tmp_path: Path) -> None:
    manifest = tiny_model(tmp_path, TinySpec(name="tiny", size=8))
    classifier = Classifier.from_manifest(manifest, ThreadPlan(threads=1, solo=2))
    seen: list[set[int]] = []
    if classifier._solo is not None:
        assert _config(classifier._solo, AFFINITIES) is None
        _record_affinity(classifier._solo, seen)
    _record_affinity(classifier._session, seen)
    classifier.predict([RED], 1, solo=True)
    assert seen == [set(CPUS)]


def _record_affinity(session: ort.InferenceSession, seen: list[set[int]]) -> None:
    run = session.run

    def recorded(*args: Any, **kwargs: Any) -> Any:
        seen.append(os.sched_getaffinity(0))
        return run(*args, **kwargs)

    session.run = recorded  # type: ignore[method-assign]


BLUE = Image.new("RGB", (8, 8), (0, 0, 255))
GREEN = Image.new("RGB", (8, 8), (0, 255, 0))


@pytest.mark.parametrize("batch", [1, 2])
def test_a_model_with_a_fixed_batch_size_runs_any_batch_in_runs_of_its_own(
    tmp_path: Path, batch: int
) -> None:
    """An export without dynamic axes takes `batch` images a run: every job of a worker's
    batch of four had failed, INVALID_ARGUMENT from ONNX Runtime."""
    manifest = tiny_model(tmp_path, TinySpec(name="fixed", size=8, batch=batch))
    classifier = Classifier.from_manifest(manifest)
    images = [RED, GREEN, BLUE, RED, BLUE]  # with 2: two full runs and one padded
    labels = [p.label for p in classifier.predict(images, 1)]
    assert labels == ["class 1", "class 2", "class 3", "class 1", "class 3"]


def test_scores_as_a_feature_map_are_one_per_label(tmp_path: Path) -> None:
    """[N, classes, 1, 1], as SqueezeNet's head gives them, had been refused at load: the
    last dimension, 1, was taken for the number of outputs."""
    manifest = tiny_model(tmp_path, TinySpec(name="map", size=8, feature_map=True))
    classifier = Classifier.from_manifest(manifest)
    assert [p.label for p in classifier.predict([RED, BLUE], 1)] == ["class 1", "class 3"]


def test_a_model_trained_on_bgr_is_given_its_channels_in_that_order(tmp_path: Path) -> None:
    """OpenCV's and Caffe's models see blue first: the red image is blue to them."""
    spec = TinySpec(name="bgr", size=8, preprocess={"channels": "BGR", "mean": (0, 0, 100)})
    classifier = Classifier.from_manifest(tiny_model(tmp_path, spec))
    # Red is the last channel the model reads, and the mean is taken from it, in its order.
    assert classifier.predict([RED], 1)[0].label == "class 3"
    assert classifier.tensor(RED)[2, 0, 0] == 155.0
    assert classifier.tensor(RED)[0, 0, 0] == 0.0


def test_a_model_that_takes_half_floats_is_given_them(tmp_path: Path) -> None:
    """A graph exported in float16 (PyTorch's .half()) had failed every run: INVALID_ARGUMENT,
    a float32 tensor where it takes float16."""
    spec = TinySpec(name="half", size=8, input_type=TensorProto.FLOAT16)
    classifier = Classifier.from_manifest(tiny_model(tmp_path, spec))
    assert [p.label for p in classifier.predict([RED, BLUE], 1)] == ["class 1", "class 3"]


def test_a_model_that_takes_pixels_as_bytes_is_given_them(tmp_path: Path) -> None:
    """As a model converted from TensorFlow Lite takes them: 0 to 255, uint8."""
    spec = TinySpec(name="bytes", size=8, input_type=TensorProto.UINT8)
    classifier = Classifier.from_manifest(tiny_model(tmp_path, spec))
    assert [p.label for p in classifier.predict([RED, BLUE], 1)] == ["class 1", "class 3"]


def test_the_output_the_manifest_names_is_the_one_read(tmp_path: Path) -> None:
    """`output.name` had been taken and never read: the first output was, here the model's
    features, and the model refused for their width."""
    spec = TinySpec(name="two", size=8, features_first=True, output_name="logits")
    classifier = Classifier.from_manifest(tiny_model(tmp_path, spec))
    assert [p.label for p in classifier.predict([RED, BLUE], 1)] == ["class 1", "class 3"]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"graph_size": 16}, r"takes 16x16 images, but its manifest's preprocess.size is 8"),
        ({"channels": 1}, r"takes 1 channel\(s\), not RGB's 3"),
        (
            {"input_type": TensorProto.UINT8, "preprocess": {"scale": 1 / 255}},
            r"takes pixels as they are \(tensor\(uint8\)\), but its manifest scales them",
        ),
        ({"input_type": TensorProto.INT8}, r"takes tensor\(int8\), not tensor\(float\)"),
        ({"input_type": TensorProto.DOUBLE}, r"takes tensor\(double\), not tensor\(float\)"),
        ({"extra_inputs": ("scale",)}, r"takes 2 inputs \(image, scale\); Tandem gives one"),
        ({"layout": "NHWC", "graph_size": 16}, r"takes 16x16 images"),
        # The graph's layout is not the manifest's, as with a model exported from TensorFlow.
        ({"layout": "NHWC", "manifest_layout": "NCHW"}, r"takes NHWC images, but its manifest"),
        ({"manifest_layout": "NHWC"}, r"takes NCHW images, but its manifest's preprocess.layout"),
        (
            {"features_first": True},
            r"gives 3 scores an image in output pooled \(its first of pooled, logits\), but its"
            r" manifest lists 10 labels",
        ),
        (
            {"features_first": True, "output_name": "scores"},
            r"has no output scores \(its outputs: pooled, logits\)",
        ),
    ],
)
def test_a_model_whose_input_is_not_the_manifests_is_refused_at_load(
    tmp_path: Path, spec: dict[str, Any], problem: str
) -> None:
    """Each had failed every request with a traceback (or its start-up), not a line."""
    manifest = tiny_model(tmp_path, TinySpec(name="odd", size=8, **spec))
    with pytest.raises(ConfigurationError, match=f"^model odd {problem}"):
        Classifier.from_manifest(manifest)


@pytest.mark.parametrize(
    ("written", "problem"),
    [
        ({"input_name": "pixels"}, r"has no input pixels \(its inputs: image\)"),
        (
            {"labels": ["one", "two"]},
            "gives 10 scores an image in output logits, but its manifest lists 2",
        ),
    ],
)
@pytest.mark.parametrize("feature_map", [False, True])
def test_a_manifest_that_names_what_the_model_lacks_is_refused_at_load(
    tmp_path: Path, written: dict[str, Any], problem: str, feature_map: bool
) -> None:
    spec = TinySpec(name="odd", size=8, feature_map=feature_map)
    manifest = tiny_model(tmp_path, spec)
    manifest.write_text(json.dumps(json.loads(manifest.read_text("utf-8")) | written), "utf-8")
    with pytest.raises(ConfigurationError, match=f"^model odd {problem}"):
        Classifier.from_manifest(manifest)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_a_model_whose_layers_fix_another_side_is_refused_by_the_check_before_serving(
    tmp_path: Path, layout: str
) -> None:
    """Its input leaves the side free, so its graph agrees with any manifest; every run of
    the manifest's images failed instead, and a worker failed job after job."""
    spec = TinySpec(name="odd", size=8, layout=layout, any_side=True, fixed_inside=16)
    manifest = tiny_model(tmp_path / "odd", spec)
    Classifier.from_manifest(manifest)  # nothing in its graph says otherwise
    with pytest.raises(
        ConfigurationError, match=r"^model odd cannot classify the bundled sample photo: "
    ):
        check_model(manifest)
    check_model(tiny_model(tmp_path / "fits", replace(spec, name="fits", size=16)))


def test_a_model_whose_scores_for_the_sample_photo_are_not_finite_is_refused_by_the_check(
    tmp_path: Path,
) -> None:
    always = {"mean": (1000.0, 0.0, 0.0)}  # red far under blue, whatever the image
    spec = TinySpec(name="nan", size=8, nan_when_blue=True, preprocess=always)
    with pytest.raises(
        ConfigurationError, match=r"^the model nan gave scores that are not finite .* photo$"
    ):
        check_model(tiny_model(tmp_path, spec))
