"""Specification of the ONNX engine, using tiny models built inside the tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from removebg_provider.engines import MODES, Mode, get_engine
from removebg_provider.engines.onnx import CONVENTIONS, OnnxEngine
from removebg_provider.errors import RemoveBgError

Dim = int | str


def save_model(
    path: Path, input_shape: list[Dim], channel_weights: tuple[float, ...] = (1.0, 0.0, 0.0)
) -> Path:
    """A one-node model whose output (N x 1 x H x W) is a weighted sum of the input channels."""
    weights = numpy_helper.from_array(
        np.array(channel_weights, np.float32).reshape(1, len(channel_weights), 1, 1), "weights"
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


@pytest.mark.parametrize(
    ("file_name", "family"),
    [
        ("u2net.onnx", "u2net"),
        ("u2netp.onnx", "u2net"),
        ("u2net_human_seg.onnx", "u2net"),
        ("silueta.onnx", "u2net"),
        ("isnet-general-use.onnx", "isnet"),
        ("isnet-anime.onnx", "isnet"),
        ("birefnet-general.onnx", "birefnet"),
        ("BiRefNet-general-epoch_244.onnx", "birefnet"),
        ("bria-rmbg-2.0.onnx", "bria"),
        ("ben2_base.onnx", "ben"),
    ],
)
def test_family_is_taken_from_the_file_name(tmp_path: Path, file_name: str, family: str) -> None:
    assert OnnxEngine(dynamic(tmp_path / file_name)).convention.family == family


def test_family_argument_overrides_the_file_name(tmp_path: Path) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "u2net.onnx"), family="birefnet")
    assert engine.convention.family == "birefnet"


@pytest.mark.parametrize(("side", "family"), [(320, "u2net"), (1024, "isnet")])
def test_family_is_inferred_from_the_input_size(tmp_path: Path, side: int, family: str) -> None:
    engine = OnnxEngine(save_model(tmp_path / "model.onnx", [1, 3, side, side]))
    assert engine.convention.family == family


def test_a_model_with_no_family_hint_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = dynamic(tmp_path / "model.onnx")
    with pytest.raises(RemoveBgError, match=r"model\.onnx.*pass family="):
        OnnxEngine(path)


def test_an_unknown_family_argument_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RemoveBgError, match="unknown model family 'sam'"):
        OnnxEngine(dynamic(tmp_path / "u2net.onnx"), family="sam")


@pytest.mark.parametrize("family", sorted(CONVENTIONS))
def test_preprocessing_follows_the_family_convention(tmp_path: Path, family: str) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "model.onnx"), family=family)
    convention = CONVENTIONS[family]
    rgb = np.zeros((50, 70, 3), np.uint8)
    rgb[...] = (200, 100, 0)
    tensor = engine.preprocess(rgb)
    assert tensor.shape == (1, 3, convention.size, convention.size)
    assert tensor.dtype == np.float32
    # rembg scales by the image maximum (200 here), then applies the family's mean and std.
    expected = (np.array([1.0, 0.5, 0.0]) - np.array(convention.mean)) / np.array(convention.std)
    assert np.allclose(tensor[0, :, 10, 10], expected, atol=1e-3)


def test_preprocessing_uses_the_models_own_fixed_input_size(tmp_path: Path) -> None:
    engine = OnnxEngine(save_model(tmp_path / "u2net.onnx", [1, 3, 48, 64]))
    assert engine.preprocess(np.zeros((100, 100, 3), np.uint8)).shape == (1, 3, 48, 64)


@pytest.mark.parametrize(
    ("family", "expected_middle"), [("birefnet", 0.3242), ("isnet", 0.2), ("u2net", 0.2)]
)
def test_postprocessing_applies_sigmoid_only_to_logit_families(
    tmp_path: Path, family: str, expected_middle: float
) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "model.onnx"), family=family)
    matte = engine.postprocess(np.array([[[[-1.0, 0.0, 4.0]]]], np.float32))
    assert matte.shape == (1, 3)
    assert matte[0, 0] == pytest.approx(0.0)
    assert matte[0, 1] == pytest.approx(expected_middle, abs=1e-3)
    assert matte[0, 2] == pytest.approx(1.0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", ["u2net", "isnet", "birefnet"])
def test_matte_reproduces_the_models_mask_at_image_size(tmp_path: Path, family: str, mode: Mode) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "model.onnx"), family=family)
    rgb = np.zeros((120, 200, 3), np.uint8)
    rgb[:, :100] = (230, 40, 40)  # the model's mask is the red channel: left half foreground
    alpha = engine.matte(rgb, mode)
    assert alpha.shape == (120, 200)
    assert alpha.dtype == np.uint8
    # Lanczos overshoot at the edge takes the min-max stretch slightly past the plateau, as in rembg.
    assert alpha[:, :90].min() >= 230
    assert alpha[:, 110:].max() <= 25


def test_get_engine_builds_the_onnx_engine_from_a_path(tmp_path: Path) -> None:
    engine = get_engine("onnx", str(dynamic(tmp_path / "isnet-general-use.onnx")))
    assert engine.name == "onnx"


def test_get_engine_needs_a_model_path_for_onnx() -> None:
    with pytest.raises(ValueError, match="needs a model path"):
        get_engine("onnx")


def test_a_missing_model_file_is_reported_by_name(tmp_path: Path) -> None:
    with pytest.raises(RemoveBgError, match=r"nothere\.onnx does not exist"):
        OnnxEngine(tmp_path / "nothere.onnx")


def test_a_corrupt_model_file_is_reported_by_name(tmp_path: Path) -> None:
    path = tmp_path / "u2net.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(RemoveBgError, match=r"cannot load .*u2net\.onnx as an ONNX model"):
        OnnxEngine(path)


def test_a_model_without_an_image_input_is_refused_by_name(tmp_path: Path) -> None:
    node = helper.make_node("Relu", ["features"], ["out"])
    graph = helper.make_graph(
        [node],
        "tabular",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 10])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "u2net.onnx"
    onnx.save(model, str(path))
    with pytest.raises(RemoveBgError, match=r"u2net\.onnx is not a usable image model.*N x 3 x H x W"):
        OnnxEngine(path)


def test_a_model_with_four_input_channels_is_refused(tmp_path: Path) -> None:
    path = save_model(tmp_path / "u2net.onnx", [1, 4, 320, 320], channel_weights=(1.0, 0.0, 0.0, 0.0))
    with pytest.raises(RemoveBgError, match="4 channels, not 3"):
        OnnxEngine(path)


def test_non_rgb_input_is_refused_with_a_hint_to_convert(tmp_path: Path) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "u2net.onnx"))
    with pytest.raises(ValueError, match="convert grayscale or RGBA images to RGB"):
        engine.matte(np.zeros((32, 32, 4), np.uint8), "fast")
