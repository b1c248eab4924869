"""A manifest written for any ONNX image classifier (`tandem models manifest`): its checksum
computed, the side and layout of its images read from the graph where it fixes them, its
labels taken from a file, one a line. What the graph cannot say (how its pixels are scaled
and normalised, how an image is resized) the one who trained it must: the defaults are
Preprocess's."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tandem.errors import ConfigurationError
from tandem.runtime.classifier import Spin, check_model, open_session
from tandem.runtime.manifest import (
    MANIFEST_NAME,
    ModelManifest,
    Output,
    Preprocess,
    sha256_of,
)
from tandem.runtime.signature import images_taken


def read_labels(path: Path) -> list[str]:
    """One label a line, as any editor saves them: a byte order mark (Windows') is no part of
    the first, and blank lines at the end are none."""
    try:
        labels = path.read_text("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read labels from {path}: {exc}") from exc
    while labels and not labels[-1].strip():
        labels.pop()
    return labels


def write_manifest(
    model_path: Path,
    labels: list[str],
    preprocess: Mapping[str, Any],
    output: Mapping[str, Any],
    *,
    name: str | None = None,
    force: bool = False,
) -> Path:
    """Write `manifest.json` beside `model_path` and check the model against it, as serving
    would; ConfigurationError, and the directory as it was, if it would not serve."""
    if not model_path.is_file():
        raise ConfigurationError(f"no model file at {model_path}")
    manifest_path = model_path.parent / MANIFEST_NAME
    if manifest_path.exists() and not force:
        raise ConfigurationError(f"{manifest_path} exists (use --force to write it anew)")
    manifest = _manifest(model_path, labels, preprocess, output, name or model_path.stem)
    # Checked under another name first: a manifest written over keeps its place till then.
    draft = manifest_path.with_name(f".{MANIFEST_NAME}.draft")
    draft.write_text(manifest.to_json(), "utf-8")
    try:
        check_model(draft)
    except ConfigurationError:
        draft.unlink()
        raise
    return draft.replace(manifest_path)


def _manifest(
    model_path: Path,
    labels: list[str],
    preprocess: Mapping[str, Any],
    output: Mapping[str, Any],
    name: str,
) -> ModelManifest:
    try:
        return ModelManifest(
            name=name,
            file=model_path.name,
            sha256=sha256_of(model_path),
            preprocess=Preprocess(**_images(model_path, preprocess)),
            output=Output(**output),
            labels=tuple(labels),
            source={"described_by": "tandem models manifest"},
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigurationError(f"cannot describe {model_path}: {problems}") from exc


def _images(model_path: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """`given`, with the layout and size of the images where the graph's input fixes them
    and `given` does not say."""
    session = open_session(model_path, 1, Spin.NEVER, optimized=False)
    taken = images_taken(session.get_inputs()[0].shape or [])
    fixed = {} if taken is None else {"layout": taken[0], "size": taken[1]}
    merged = fixed | dict(given)
    if "size" not in merged:
        raise ConfigurationError(
            f"the graph of {model_path} does not fix the side of its images: give --size"
            " (and --layout NHWC if it takes channels last)"
        )
    return merged
