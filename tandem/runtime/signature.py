"""What a model's graph takes, checked against its manifest as the model loads.

A manifest says how images are prepared; the graph says what it will take. Where the two
disagree (another side, channels or element type, a second input), every run had failed
with ONNX Runtime's INVALID_ARGUMENT: each request a traceback, or start-up one. Here the
model is refused as it loads, in a line that names the difference. A batch size the graph
fixes is no disagreement: an export without dynamic axes takes one image a run, and the
classifier runs a batch in runs of that size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from tandem.errors import ConfigurationError
from tandem.runtime.manifest import ModelManifest

FLOAT = "tensor(float)"  # what to_tensor makes
CHANNELS = 3  # RGB


@dataclass(frozen=True, slots=True)
class ImageInput:
    """The graph's image input: its name, and its batch size if the graph fixes one."""

    name: str
    batch: int | None = None


def image_input(manifest: ModelManifest, session: ort.InferenceSession) -> ImageInput:
    """The input the images go to; ConfigurationError if the graph will not take them, or
    gives scores for other labels than the manifest's."""
    _check_output_width(manifest, session.get_outputs()[0].shape)
    arg = _the_one_input(manifest, session.get_inputs())
    if arg.type != FLOAT:
        raise _refusal(manifest, f"takes {arg.type}, not {FLOAT}")
    return ImageInput(arg.name, _batch_of(manifest, list(arg.shape or [])))


def _batch_of(manifest: ModelManifest, shape: list[Any]) -> int | None:
    """The batch size `shape` fixes, if any, once the rest of it is the manifest's images."""
    layout = manifest.preprocess.layout
    if len(shape) != 4:
        raise _refusal(manifest, f"takes {len(shape)} dimensions, not images in {layout}")
    problem = _image_problem(shape, layout, manifest.preprocess.size)
    if problem is None:
        return _in_nchw_order(shape, layout)[0]
    other = "NHWC" if layout == "NCHW" else "NCHW"
    if _image_problem(shape, other, manifest.preprocess.size) is None:
        problem = f"takes {other} images, but its manifest's preprocess.layout is {layout}"
    raise _refusal(manifest, problem)


def _image_problem(shape: list[Any], layout: str, size: int) -> str | None:
    """What keeps `shape` from taking RGB images of `size` in `layout`, if anything."""
    _, channels, height, width = _in_nchw_order(shape, layout)
    if (height or size) != size or (width or size) != size:
        sides = f"{height or '?'}x{width or '?'}"
        return f"takes {sides} images, but its manifest's preprocess.size is {size}"
    if (channels or CHANNELS) != CHANNELS:
        return f"takes {channels} channel(s), not RGB's {CHANNELS}"
    return None


def _check_output_width(manifest: ModelManifest, shape: Any) -> None:
    """One score per label an image, however many dimensions hold them: [N, classes], or
    [N, classes, 1, 1] as a convolutional head leaves them (SqueezeNet's)."""
    per_image = list(shape or [])[1:]
    if not per_image or not all(isinstance(dim, int) for dim in per_image):
        return  # left to the graph: a symbolic width is known only when it runs
    width = math.prod(per_image)
    if width != len(manifest.labels):
        raise _refusal(
            manifest, f"has {width} outputs but its manifest lists {len(manifest.labels)} labels"
        )


def _the_one_input(manifest: ModelManifest, inputs: Sequence[Any]) -> Any:
    names = [arg.name for arg in inputs]
    listed = ", ".join(names)
    if manifest.input_name is not None and manifest.input_name not in names:
        raise _refusal(manifest, f"has no input {manifest.input_name} (its inputs: {listed})")
    if len(inputs) != 1:
        raise _refusal(
            manifest, f"takes {len(inputs)} inputs ({listed}); Tandem gives one, the image"
        )
    return inputs[0]


def _in_nchw_order(shape: list[Any], layout: str) -> tuple[int | None, ...]:
    """The batch, channel, height and width dimensions; None where the graph fixes none."""
    fixed = [dim if isinstance(dim, int) and dim > 0 else None for dim in shape]
    if layout == "NHWC":
        batch, height, width, channels = fixed
        return batch, channels, height, width
    return tuple(fixed)


def _refusal(manifest: ModelManifest, problem: str) -> ConfigurationError:
    return ConfigurationError(f"model {manifest.name} {problem}")
