"""The manifest that sits beside every ONNX model: everything needed to feed it and read it."""

from __future__ import annotations

import hashlib
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tandem.errors import ConfigurationError, ModelNotFound

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


class Layout(StrEnum):
    NCHW = "NCHW"
    NHWC = "NHWC"


class Resize(StrEnum):
    # Scale the short side to `resize_size`, then cut the centre `size` square (EfficientNet eval).
    SHORT_SIDE_CROP = "short_side_center_crop"
    # Scale the whole image to the `size` square, ignoring aspect ratio (TF Hub image models).
    STRETCH = "stretch"


class Preprocess(BaseModel):
    """How raw RGB pixels in 0..255 become the model's input: ((x * scale) - mean) / std."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(gt=0)
    layout: Layout = Layout.NCHW
    resize: Resize = Resize.SHORT_SIDE_CROP
    resize_size: int | None = Field(None, gt=0, description="Short side before the crop.")
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    scale: float = 1.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    channels: Literal["RGB", "BGR"] = Field(
        default="RGB",
        description="The order of the colour channels the model was trained on (OpenCV's and "
        "Caffe's: BGR); mean and std are in that order.",
    )

    @property
    def decode_side(self) -> int:
        """The shortest side a decoded image needs for this preprocessing to lose nothing."""
        return self.resize_size or self.size if self.resize is Resize.SHORT_SIDE_CROP else self.size

    @model_validator(mode="after")
    def _crop_fits(self) -> Preprocess:
        if self.resize is Resize.SHORT_SIDE_CROP and (self.resize_size or self.size) < self.size:
            raise ValueError("resize_size must be at least size")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self


class Output(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str | None = None
    kind: Literal["logits", "probabilities"] = "logits"
    background_index: int | None = Field(
        None, description="An output that is no class (TF Hub's index 0); never reported."
    )


class ModelManifest(BaseModel):
    """Serialized as manifest.json; `file` is relative to the manifest's directory."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = MANIFEST_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input_name: str | None = None
    preprocess: Preprocess
    output: Output = Output(background_index=None)
    labels: tuple[str, ...] = Field(min_length=1)
    source: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _background_in_range(self) -> ModelManifest:
        bg = self.output.background_index
        if bg is not None and not 0 <= bg < len(self.labels):
            raise ValueError("output.background_index is outside the labels")
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path: Path) -> ModelManifest:
    try:
        return ModelManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise ModelNotFound(f"no model manifest at {path}") from exc
    except (OSError, ValidationError) as exc:
        raise ConfigurationError(f"invalid model manifest {path}: {exc}") from exc


def verified_model(manifest_path: Path) -> tuple[ModelManifest, Path]:
    """A manifest and the model file it names, checked: the file is there and matches its
    checksum (ModelNotFound, ConfigurationError)."""
    manifest = read_manifest(manifest_path)
    model_path = manifest_path.parent / manifest.file
    if not model_path.is_file():
        raise ModelNotFound(f"model file {model_path} named by {manifest_path} is missing")
    if sha256_of(model_path) != manifest.sha256:
        raise ConfigurationError(f"{model_path} does not match the checksum in its manifest")
    return manifest, model_path


def resolve_manifest_path(ref: str, model_dir: Path) -> Path:
    """A model reference is a manifest path, a directory holding one, or a built model's name."""
    path = Path(ref).expanduser()
    if path.suffix == ".json":
        return path
    if path.is_dir():
        return path / MANIFEST_NAME
    if path.is_file():  # the .onnx itself, most likely
        raise ModelNotFound(
            f"model {ref!r} is a model file, not its manifest: name the {MANIFEST_NAME} that"
            " describes it, or the directory holding both (see the README's \"Any ONNX image"
            ' classifier")'
        )
    if "/" in ref or ref.startswith("."):
        raise ModelNotFound(f"model {ref!r}: no such manifest or model directory")
    return model_dir / ref / MANIFEST_NAME


def model_name(ref: str, model_dir: Path) -> str:
    """The name a model reference stands for; the reference itself if no manifest is readable
    here (a proxy need not hold the files of a model that only remote workers run)."""
    try:
        return read_manifest(resolve_manifest_path(ref, model_dir)).name
    except ConfigurationError:
        return ref
