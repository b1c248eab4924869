"""The exported ONNX models compute what the PyTorch reference computes, on real photos; and
the logits a build checks itself against are the reference's."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data as photos

from tandem.runtime.build import BUILTIN_MODELS, MAX_EXPORT_DIFF, probe_input
from tandem.runtime.classifier import load_classifier
from tandem.runtime.imaging import decode_image
from tests.support import encode

pytestmark = pytest.mark.slow

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry"]


def reference_model(name: str) -> torch.nn.Module:
    spec = BUILTIN_MODELS[name]
    arch = importlib.import_module("efficientnet_lite_pytorch")
    model = arch.EfficientNet.from_pretrained(spec.arch, weights_path=str(spec.weights_file()))
    return model.eval()


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_onnx_matches_torch_on_real_photos(name: str, model_dir: Path) -> None:
    classifier = load_classifier(name, model_dir)
    reference = reference_model(name)
    for photo in PHOTOS:
        image = decode_image(encode(getattr(photos, photo)(), "JPEG", quality=95))
        batch = classifier.tensor(image)[None]
        with torch.no_grad():
            expected = reference(torch.from_numpy(batch)).numpy()[0]
        got = classifier.raw_scores(batch)[0]
        assert np.abs(expected - got).max() < 1e-3, photo
        assert list(np.argsort(-expected)[:5]) == list(np.argsort(-got)[:5]), photo


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_the_build_s_reference_logits_are_torch_s(name: str) -> None:
    spec = BUILTIN_MODELS[name]
    with torch.no_grad():
        logits = reference_model(name)(torch.from_numpy(probe_input(spec.size))).numpy()[0]
    top = [int(i) for i in np.argsort(-logits)[:5]]
    assert [index for index, _ in spec.reference_logits] == top
    for index, value in spec.reference_logits:
        assert abs(float(logits[index]) - value) < MAX_EXPORT_DIFF / 10


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_batched_inference_equals_one_by_one(name: str, model_dir: Path) -> None:
    classifier = load_classifier(name, model_dir)
    images = [decode_image(encode(getattr(photos, p)())) for p in PHOTOS[:4]]
    together = classifier.predict(images, 5)
    alone = [classifier.predict([image], 5)[0] for image in images]
    for a, b in zip(together, alone, strict=True):
        assert [s.index for s in a.top_k] == [s.index for s in b.top_k]
        assert a.top_k[0].probability == pytest.approx(b.top_k[0].probability, abs=1e-4)


def test_preprocessing_follows_efficientnet_lite_eval(model_dir: Path) -> None:
    # Short side to 224 + 32 with bicubic, centre crop 224, (x - 127) / 128, NCHW.
    manifest = load_classifier("efficientnet_lite0", model_dir).manifest
    spec = manifest.preprocess
    assert (spec.size, spec.resize_size, spec.interpolation) == (224, 256, "bicubic")
    assert spec.mean == (127.0, 127.0, 127.0)
    assert spec.std == (128.0, 128.0, 128.0)
    assert load_classifier("efficientnet_lite2", model_dir).manifest.preprocess.size == 260
    assert len(manifest.labels) == 1000
    assert manifest.labels[281] == "tabby"
