"""Tiny ONNX models built by the tests with the input and output shapes of real ones (none is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Dim = int | str


# Per class (background, upper, lower, full body), its score as weights of the input's R, G, B.
CLOTH_CLASSES = ((-1.0, 0.0, 1.0), (1.0, 0.0, -1.0), (-1.0, -1.0, -1.0), (-1.0, -1.0, -1.0))


def save_model(
    path: Path,
    input_shape: list[Dim],
    channel_weights: tuple[float, ...] = (1.0, 0.0, 0.0),
    class_weights: tuple[tuple[float, ...], ...] | None = None,
) -> Path:
    """A one-node model whose output (N x 1 x H x W) is a weighted sum of the input channels.

    With `class_weights`, one output channel per class instead (N x classes x H x W).
    """
    rows = class_weights or (channel_weights,)
    weights = numpy_helper.from_array(
        np.array(rows, np.float32).reshape(len(rows), len(rows[0]), 1, 1), "weights"
    )
    node = helper.make_node("Conv", ["image", "weights"], ["mask"])
    graph = helper.make_graph(
        [node],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, None)],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def dynamic(path: Path) -> Path:
    return save_model(path, ["n", 3, "h", "w"])


def save_two_output_model(path: Path, second_output: str) -> Path:
    """Output 0 is the red channel; output 1 the blue channel, or (`bfloat16`) the image in bfloat16."""
    red = numpy_helper.from_array(np.array([1.0, 0.0, 0.0], np.float32).reshape(1, 3, 1, 1), "red")
    blue = numpy_helper.from_array(np.array([0.0, 0.0, 1.0], np.float32).reshape(1, 3, 1, 1), "blue")
    nodes = [helper.make_node("Conv", ["image", "red"], ["mask"])]
    if second_output == "bfloat16":
        nodes.append(helper.make_node("Cast", ["image"], ["aux"], to=TensorProto.BFLOAT16))
        aux_type = TensorProto.BFLOAT16
    else:
        nodes.append(helper.make_node("Conv", ["image", "blue"], ["aux"]))
        aux_type = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes,
        "two-outputs",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("aux", aux_type, None),
        ],
        initializer=[red, blue],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def padded_model_bytes(path: Path, padding_floats: int) -> bytes:
    """A valid dynamic-size model (mask = red channel) made larger by an unused weight of random floats,
    so that a download of it takes several reads; saved at `path` and returned as bytes."""
    save_model(path, ["n", 3, "h", "w"])
    model = onnx.load(str(path))
    noise = np.random.default_rng(7).random(padding_floats, dtype=np.float32)
    model.graph.initializer.append(numpy_helper.from_array(noise, "padding"))
    onnx.save(model, str(path))
    return path.read_bytes()
