"""Specification of the ONNX engine, using tiny models built inside the tests (nothing is downloaded)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from removebg_provider.engines import MODES, Mode, get_engine
from removebg_provider.engines.onnx import OnnxEngine
from removebg_provider.engines.presets import PRESETS
from removebg_provider.errors import RemoveBgError
from support.onnx_models import CLOTH_CLASSES, dynamic, save_model, save_two_output_model


@pytest.mark.parametrize(
    ("file_name", "preset"),
    [
        ("u2net.onnx", "u2net"),
        ("u2netp.onnx", "u2netp"),
        ("u2net_human_seg.onnx", "u2net_human_seg"),
        ("u2net_cloth_seg.onnx", "u2net_cloth_seg"),
        ("silueta.onnx", "silueta"),
        ("isnet-general-use.onnx", "isnet-general-use"),
        ("isnet-anime.onnx", "isnet-anime"),
        ("birefnet-general.onnx", "birefnet-general"),
        ("BiRefNet-general-epoch_244.onnx", "birefnet-general"),
        ("BiRefNet-portrait-epoch_150.onnx", "birefnet-portrait"),
        ("bria-rmbg-2.0.onnx", "bria-rmbg"),
        ("ben2_base.onnx", "ben"),
        ("my-u2net-finetune.onnx", "u2net"),
        ("dis_custom.onnx", "isnet-general-use"),
        ("BiRefNet_lite-matting.onnx", "birefnet-general"),
    ],
)
def test_without_a_preset_the_file_name_chooses_one(tmp_path: Path, file_name: str, preset: str) -> None:
    assert OnnxEngine(dynamic(tmp_path / file_name)).preset.name == preset


def test_an_explicit_preset_wins_over_the_file_name(tmp_path: Path) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "u2net.onnx"), preset="birefnet-general")
    assert engine.preset.name == "birefnet-general"
    assert engine.convention == PRESETS["birefnet-general"].convention


@pytest.mark.parametrize(("side", "preset"), [(320, "u2net"), (1024, "isnet-general-use")])
def test_without_a_name_hint_the_input_size_chooses_the_preset(
    tmp_path: Path, side: int, preset: str
) -> None:
    engine = OnnxEngine(save_model(tmp_path / "model.onnx", [1, 3, side, side]))
    assert engine.preset.name == preset


def test_a_model_with_no_hint_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = dynamic(tmp_path / "model.onnx")
    with pytest.raises(RemoveBgError, match=r"model\.onnx.*--model-preset"):
        OnnxEngine(path)


def test_an_unknown_preset_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(RemoveBgError, match=r"unknown model preset 'sam'.*isnet-general-use"):
        OnnxEngine(dynamic(tmp_path / "u2net.onnx"), preset="sam")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preprocessing_follows_the_presets_size_and_normalisation(tmp_path: Path, preset: str) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "model.onnx"), preset=preset)
    convention = PRESETS[preset].convention
    rgb = np.zeros((50, 70, 3), np.uint8)
    rgb[...] = (200, 100, 0)
    tensor = engine.preprocess(rgb)
    assert tensor.shape == (1, 3, convention.size, convention.size)
    assert tensor.dtype == np.float32
    # rembg scales by the image maximum (200 here), then applies the preset's mean and std.
    expected = (np.array([1.0, 0.5, 0.0]) - np.array(convention.mean)) / np.array(convention.std)
    assert np.allclose(tensor[0, :, 10, 10], expected, atol=1e-3)


@pytest.mark.parametrize(
    ("preset", "mean", "std"),
    [
        ("u2net", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("isnet-general-use", (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)),
        ("isnet-anime", (0.485, 0.456, 0.406), (1.0, 1.0, 1.0)),
        ("birefnet-general", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ("ben", (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)),
    ],
)
def test_each_family_keeps_rembgs_normalisation(
    preset: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> None:
    assert PRESETS[preset].convention.mean == mean
    assert PRESETS[preset].convention.std == std


def test_the_input_is_shrunk_with_an_antialiasing_filter(tmp_path: Path) -> None:
    # One-pixel stripes average to grey when shrunk with a filter that looks at every pixel
    # (Pillow's Lanczos, as rembg); sampling a few neighbours would keep whole stripes.
    engine = OnnxEngine(dynamic(tmp_path / "u2net.onnx"))
    stripes = np.zeros((960, 960, 3), np.uint8)
    stripes[:, ::2] = 255
    tensor = engine.preprocess(stripes)
    channel = tensor[0, 0] * 0.229 + 0.485  # undo the normalisation: back to [0, 1]
    assert channel[40:280, 40:280].std() < 0.05


def test_the_matte_is_read_from_the_output_the_preset_names(tmp_path: Path) -> None:
    # Output 0 (what every rembg model's preset reads) is the red channel, output 1 the blue one.
    engine = OnnxEngine(save_two_output_model(tmp_path / "u2net.onnx", second_output="blue"))
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[:, :32] = (250, 0, 0)
    rgb[:, 32:] = (0, 0, 250)
    alpha = engine.matte(rgb, "fast")
    assert alpha[:, :24].min() >= 230
    assert alpha[:, 40:].max() <= 25


def test_outputs_the_preset_does_not_read_are_not_fetched(tmp_path: Path) -> None:
    # onnxruntime cannot hand a bfloat16 tensor to numpy: fetching every output would fail here.
    engine = OnnxEngine(save_two_output_model(tmp_path / "isnet-general-use.onnx", second_output="bfloat16"))
    alpha = engine.matte(np.full((40, 40, 3), 128, np.uint8), "fast")
    assert alpha.shape == (40, 40)


def test_a_preset_reading_a_missing_output_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No rembg model reads another output than the first; a table entry made here stands for one.
    shifted = dataclasses.replace(PRESETS["u2net"].convention, output_index=1)
    monkeypatch.setitem(PRESETS, "shifted", dataclasses.replace(PRESETS["u2net"], convention=shifted))
    with pytest.raises(RemoveBgError, match=r"has 1 output.*reads output number 1"):
        OnnxEngine(dynamic(tmp_path / "model.onnx"), preset="shifted")


def test_preprocessing_uses_the_models_own_fixed_input_size(tmp_path: Path) -> None:
    engine = OnnxEngine(save_model(tmp_path / "u2net.onnx", [1, 3, 48, 64]))
    assert engine.preprocess(np.zeros((100, 100, 3), np.uint8)).shape == (1, 3, 48, 64)


@pytest.mark.parametrize(
    ("preset", "expected_middle"),
    [("birefnet-general", 0.3242), ("bria-rmbg", 0.2), ("isnet-general-use", 0.2), ("u2net", 0.2)],
)
def test_postprocessing_applies_sigmoid_only_to_logit_presets(
    tmp_path: Path, preset: str, expected_middle: float
) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "model.onnx"), preset=preset)
    matte = engine.postprocess(np.array([[[[-1.0, 0.0, 4.0]]]], np.float32))
    assert matte.shape == (1, 3)
    assert matte[0, 0] == pytest.approx(0.0)
    assert matte[0, 1] == pytest.approx(expected_middle, abs=1e-3)
    assert matte[0, 2] == pytest.approx(1.0)


def test_cloth_segmentation_keeps_every_pixel_whose_best_class_is_not_background(tmp_path: Path) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "model.onnx"), preset="u2net_cloth_seg")
    # Four class scores (background, upper, lower, full body) for three pixels.
    background, upper, lower, full = [5.0, 0.0, 0.0], [1.0, 4.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 3.0]
    scores = np.array([[[background], [upper], [lower], [full]]], np.float32)
    assert engine.postprocess(scores).tolist() == [[0.0, 1.0, 1.0]]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", ["u2net", "isnet-general-use", "birefnet-general", "bria-rmbg"])
def test_matte_reproduces_the_models_mask_at_image_size(tmp_path: Path, preset: str, mode: Mode) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "model.onnx"), preset=preset)
    rgb = np.zeros((120, 200, 3), np.uint8)
    rgb[:, :100] = (230, 40, 40)  # the model's mask is the red channel: left half foreground
    alpha = engine.matte(rgb, mode)
    assert alpha.shape == (120, 200)
    assert alpha.dtype == np.uint8
    # Lanczos overshoot at the edge takes the min-max stretch slightly past the plateau, as in rembg.
    assert alpha[:, :90].min() >= 230
    assert alpha[:, 110:].max() <= 25


def test_precise_mode_refines_a_photo_larger_than_the_models_output(tmp_path: Path) -> None:
    engine = OnnxEngine(save_model(tmp_path / "u2net.onnx", [1, 3, 32, 48]))
    rgb = np.zeros((240, 400, 3), np.uint8)
    rgb[:, :200] = (230, 40, 40)
    alpha = engine.matte(rgb, "precise")
    assert alpha.shape == (240, 400)
    assert alpha[:, :180].min() >= 230
    assert alpha[:, 220:].max() <= 25


def test_cloth_segmentation_cuts_out_the_clothes_at_image_size(tmp_path: Path) -> None:
    # Class scores: background = blue channel, upper-body clothes = red channel.
    path = save_model(tmp_path / "u2net_cloth_seg.onnx", ["n", 3, "h", "w"], class_weights=CLOTH_CLASSES)
    engine = OnnxEngine(path)
    rgb = np.zeros((96, 128, 3), np.uint8)
    rgb[:, :64] = (240, 10, 10)
    rgb[:, 64:] = (10, 10, 240)
    alpha = engine.matte(rgb, "fast")
    assert alpha[:, :56].min() >= 230
    assert alpha[:, 72:].max() <= 25


def test_health_details_name_the_model_file_and_its_preset(tmp_path: Path) -> None:
    engine = OnnxEngine(dynamic(tmp_path / "isnet-anime.onnx"))
    assert engine.details == {"model": "isnet-anime.onnx", "preset": "isnet-anime"}


def test_get_engine_builds_the_onnx_engine_from_a_path(tmp_path: Path) -> None:
    engine = get_engine("onnx", str(dynamic(tmp_path / "isnet-general-use.onnx")))
    assert engine.name == "onnx"


def test_get_engine_needs_a_model_for_onnx() -> None:
    with pytest.raises(ValueError, match="needs a model"):
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
