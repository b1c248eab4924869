"""EfficientNet-Lite's graph, as read from its weights."""

from __future__ import annotations

from collections import Counter

import pytest

from tandem.runtime.build import BUILTIN_MODELS
from tandem.runtime.efficientnet import blocks, efficientnet_lite, same_padding
from tandem.runtime.torchfile import StateDict, load_state_dict


def _weights(name: str) -> StateDict:
    return load_state_dict(BUILTIN_MODELS[name].weights_file())


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pads", "out"),
    [
        (224, 3, 2, [0, 0, 1, 1], 112),  # TensorFlow's SAME puts the odd pixel after
        (260, 3, 2, [0, 0, 1, 1], 130),
        (28, 5, 2, [1, 1, 2, 2], 14),
        (14, 5, 1, [2, 2, 2, 2], 14),
        (7, 1, 1, [0, 0, 0, 0], 7),
    ],
)
def test_same_padding_is_tensorflow_s(
    size: int, kernel: int, stride: int, pads: list[int], out: int
) -> None:
    assert same_padding(size, kernel, stride) == (pads, out)


@pytest.mark.parametrize(
    ("name", "repeats"),
    [
        # efficientnet-lite-pytorch's stages: r1 r2 r2 r3 r3 r4 r1, Lite2's deepened by 1.2
        # but for its first and last (the stem and head stay fixed).
        ("efficientnet_lite0", [1, 2, 2, 3, 3, 4, 1]),
        ("efficientnet_lite2", [1, 3, 3, 4, 4, 5, 1]),
    ],
)
def test_the_blocks_follow_the_stages(name: str, repeats: list[int]) -> None:
    found = blocks(_weights(name))
    firsts = [i for i, block in enumerate(found) if not block.residual]
    assert [b - a for a, b in zip(firsts, [*firsts[1:], len(found)], strict=True)] == repeats
    assert [found[i].stride for i in firsts] == [1, 2, 2, 2, 1, 2, 1]
    assert [found[i].kernel for i in firsts] == [3, 3, 5, 3, 5, 5, 3]
    assert not found[0].expands  # expand ratio 1 in the first stage alone
    assert all(block.expands for block in found[1:])


def test_the_graph_holds_no_op_but_the_network_s_own() -> None:
    """torch's exporter wrote each SAME padding as a Pad with its shape computed in the graph
    (17 in Lite0, with some 350 nodes of shape arithmetic); here they are the Conv's pads."""
    model = efficientnet_lite(_weights("efficientnet_lite0"), 224)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops == {
        "Conv": 49,
        "Clip": 33,
        "Add": 9,
        "GlobalAveragePool": 1,
        "Flatten": 1,
        "Gemm": 1,
    }
    (given,) = model.graph.input
    assert [d.dim_param or d.dim_value for d in given.type.tensor_type.shape.dim] == [
        "batch",
        3,
        224,
        224,
    ]
