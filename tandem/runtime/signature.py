"""What a model's graph takes, checked against its manifest as the model loads.

A manifest says how images are prepared and which output holds the scores; the graph says
what it will take and give. Where the two disagree (another side, channels or element type,
a second input, another number of scores), every run had failed with ONNX Runtime's
INVALID_ARGUMENT, or scores been read for the wrong labels. Here the model is refused as it
loads, in a line that names the difference. A batch size the graph fixes is no
disagreement: an export without dynamic axes takes one image a run, and the classifier
runs a batch in runs of that size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from tandem.errors import ConfigurationError
from tandem.runtime.manifest import Layout, ModelManifest, Preprocess

# The element types of an image input, and the arrays a run gives them: to_tensor makes
# float32, cast for a graph exported in half precision (PyTorch's .half()), or for one that
# takes the pixels as they are, 0 to 255 (converted from TensorFlow Lite).
ELEMENTS: dict[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(uint8)": np.dtype(np.uint8),
}
FLOATS = ("tensor(float)", "tensor(float16)")
CHANNELS = 3  # RGB


@dataclass(frozen=True, slots=True)
class Signature:
    """The graph's image input, the batch size it fixes (if any), and its scores' output."""

    input: str
    batch: int | None
    output: str
    element: np.dtype[Any] = ELEMENTS["tensor(float)"]


def signature(manifest: ModelManifest, session: ort.InferenceSession) -> Signature:
    """What runs of the graph take and give; ConfigurationError if the graph will not take
    the manifest's images, or gives scores for other labels than the manifest's."""
    image = _the_one_input(manifest, session.get_inputs())
    if image.type not in ELEMENTS:
        raise _refusal(manifest, f"takes {image.type}, not {' or '.join(ELEMENTS)}")
    if image.type not in FLOATS and not _pixels_as_they_are(manifest.preprocess):
        raise _refusal(
            manifest,
            f"takes pixels as they are ({image.type}), but its manifest scales them: give it"
            " scale 1, mean 0 and std 1",
        )
    batch = _batch_of(manifest, list(image.shape or []))
    scores = _the_scores(manifest, session.get_outputs())
    return Signature(image.name, batch, scores.name, ELEMENTS[image.type])


def images_taken(shape: Sequence[Any]) -> tuple[Layout, int] | None:
    """The layout and side of the RGB images a graph's input `shape` fixes, if it fixes them."""
    if len(shape) != 4:
        return None
    for layout in Layout:
        _, channels, height, width = _in_nchw_order(list(shape), layout)
        if channels == CHANNELS and height is not None and height == width:
            return layout, height
    return None


def _pixels_as_they_are(preprocess: Preprocess) -> bool:
    """Whether the tensor holds whole pixel values, which a cast to bytes keeps."""
    return (preprocess.scale, preprocess.mean, preprocess.std) == (1.0, (0, 0, 0), (1, 1, 1))


def _batch_of(manifest: ModelManifest, shape: list[Any]) -> int | None:
    """The batch size `shape` fixes, if any, once the rest of it is the manifest's images."""
    layout = manifest.preprocess.layout
    if len(shape) != 4:
        raise _refusal(manifest, f"takes {len(shape)} dimensions, not images in {layout}")
    problem = _image_problem(shape, layout, manifest.preprocess.size)
    if problem is None:
        return _in_nchw_order(shape, layout)[0]
    other = Layout.NHWC if layout is Layout.NCHW else Layout.NCHW
    if _image_problem(shape, other, manifest.preprocess.size) is None:
        problem = f"takes {other} images, but its manifest's preprocess.layout is {layout}"
    raise _refusal(manifest, problem)


def _image_problem(shape: list[Any], layout: Layout, size: int) -> str | None:
    """What keeps `shape` from taking RGB images of `size` in `layout`, if anything."""
    _, channels, height, width = _in_nchw_order(shape, layout)
    if (height or size) != size or (width or size) != size:
        sides = f"{height or '?'}x{width or '?'}"
        return f"takes {sides} images, but its manifest's preprocess.size is {size}"
    if (channels or CHANNELS) != CHANNELS:
        return f"takes {channels} channel(s), not RGB's {CHANNELS}"
    return None


def _the_scores(manifest: ModelManifest, outputs: Sequence[Any]) -> Any:
    """The output the manifest names, or else the first, checked to give one score per label
    an image."""
    names = [arg.name for arg in outputs]
    wanted = manifest.output.name
    if wanted is None:
        named = len(names) == 1
        scores = outputs[0]
    elif wanted in names:
        named = True
        scores = outputs[names.index(wanted)]
    else:
        raise _refusal(manifest, f"has no output {wanted} (its outputs: {', '.join(names)})")
    which = scores.name if named else f"{scores.name} (its first of {', '.join(names)})"
    width = _scores_an_image(list(scores.shape or []))
    if width is not None and width != len(manifest.labels):
        raise _refusal(
            manifest,
            f"gives {width} scores an image in output {which}, but its manifest lists"
            f" {len(manifest.labels)} labels",
        )
    return scores


def _scores_an_image(shape: list[Any]) -> int | None:
    """How many numbers an output of `shape` gives an image, however many dimensions hold
    them ([N, classes], or [N, classes, 1, 1] as a convolutional head leaves them, such as
    SqueezeNet's); None if the graph leaves that to the run."""
    per_image = shape[1:]
    if not per_image or not all(isinstance(dim, int) for dim in per_image):
        return None
    return int(math.prod(per_image))


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


def _in_nchw_order(shape: list[Any], layout: Layout) -> tuple[int | None, ...]:
    """The batch, channel, height and width dimensions; None where the graph fixes none."""
    fixed = [dim if isinstance(dim, int) and dim > 0 else None for dim in shape]
    if layout is Layout.NHWC:
        batch, height, width, channels = fixed
        return batch, channels, height, width
    return tuple(fixed)


def _refusal(manifest: ModelManifest, problem: str) -> ConfigurationError:
    return ConfigurationError(f"model {manifest.name} {problem}")
