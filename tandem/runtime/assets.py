"""Files that ship inside the package."""

from __future__ import annotations

from importlib import resources

IMAGENET_CLASSES = 1000


def imagenet_labels() -> tuple[str, ...]:
    """ImageNet-1k class names in index order (from torchvision 0.29.1, BSD-3-Clause)."""
    text = resources.files("tandem.data").joinpath("imagenet_classes.txt").read_text("utf-8")
    return tuple(line for line in text.splitlines() if line)


def sample_image_bytes() -> bytes:
    """The bundled test photo (scikit-image's `chelsea`, CC0), served by /predict/test."""
    return resources.files("tandem.data").joinpath("cat.jpg").read_bytes()
