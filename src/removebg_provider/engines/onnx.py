"""The model engine: runs a rembg-style ONNX salient-object or matting model with its conventions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from removebg_provider.engines import MODES, Mode
from removebg_provider.engines._guided import apply_coefficients, guided_coefficients
from removebg_provider.engines.presets import PRESETS, ModelConvention, ModelPreset
from removebg_provider.errors import RemoveBgError

# The fallback when no preset is given: patterns of the file names rembg users keep in ~/.u2net,
# checked in order, after an exact match with a preset's name or download file name.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"birefnet", "birefnet-general"),
    (r"isnet|dis[-_]", "isnet-general-use"),
    (r"bria|rmbg", "bria-rmbg"),
    (r"(^|[-_])ben(\d|[-_.]|$)", "ben"),
    (r"u2net|silueta", "u2net"),
)

# Square input sides that identify a preset when neither the caller nor the file name does.
_SIZE_PRESETS = {320: "u2net", 1024: "isnet-general-use"}


@dataclass(frozen=True)
class OnnxModeParams:
    """What differs between the modes for model engines."""

    refine_edges: bool  # snap the upsampled matte to full-resolution image edges (guided filter)
    guide_radius: int
    guide_eps: float


ONNX_MODE_PARAMS: dict[Mode, OnnxModeParams] = {
    "fast": OnnxModeParams(refine_edges=False, guide_radius=0, guide_eps=0.0),
    "precise": OnnxModeParams(refine_edges=True, guide_radius=3, guide_eps=1e-3),
}


class OnnxEngine:
    """Background removal with a salient-object/matting ONNX model (U2-Net, IS-Net, BiRefNet, ...).

    Its conventions come from `preset` (a name in `presets.PRESETS`) if given, else from the file
    name, else from the model's input size. Takes RGB only (H x W x 3 uint8); callers convert
    grayscale or RGBA first.
    """

    name = "onnx"

    def __init__(self, model_path: str | Path, preset: str | None = None, threads: int | None = None) -> None:
        """`threads`: onnxruntime's threads per call (None: its default, one per core)."""
        import onnxruntime as ort

        self.model_path = Path(model_path).expanduser()
        if not self.model_path.is_file():
            raise RemoveBgError(
                f"ONNX model file {self.model_path} does not exist; pass the path of a .onnx file"
            )
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(
                str(self.model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises several unrelated types for unreadable models
            raise RemoveBgError(
                f"cannot load {self.model_path} as an ONNX model ({exc}); "
                "check that the file is a complete .onnx"
            ) from exc
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self._fixed_size = _check_image_input(self.model_path, model_input.shape, model_input.type)
        self._input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        self.preset = self._choose_preset(preset)
        self.convention = self.preset.convention
        self._output_name = self._used_output_name(self.convention)
        self._resample = Image.Resampling[self.convention.resize_filter.upper()]
        self.size = self._fixed_size or (self.convention.size, self.convention.size)

    @property
    def details(self) -> dict[str, str]:
        """What `GET /health` tells about this engine: the model file's name and the preset it runs with."""
        return {"model": self.model_path.name, "preset": self.preset.name}

    def matte(self, rgb: np.ndarray, mode: Mode) -> np.ndarray:
        """Return the alpha matte (H x W uint8, 255 = foreground) predicted by the model."""
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(
                f"engines take RGB images as H x W x 3 uint8 arrays, "
                f"got shape {getattr(rgb, 'shape', None)}; "
                "convert grayscale or RGBA images to RGB before calling matte()"
            )
        if mode not in ONNX_MODE_PARAMS:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        params = ONNX_MODE_PARAMS[mode]
        tensor = self.preprocess(rgb).astype(self._input_dtype)
        # Only the output we read: IS-Net models also return side outputs and feature maps (about
        # 120 MB per call at 1024 x 1024) that onnxruntime would otherwise copy out for nothing.
        (output,) = self._session.run([self._output_name], {self._input_name: tensor})
        prediction = self.postprocess(np.asarray(output))
        h, w = rgb.shape[:2]
        if params.refine_edges:
            if h * w <= prediction.size:
                # A photo smaller than the model's output: fit the filter at the photo's own size, not
                # on the photo enlarged to the model's (1024 x 1024 is 4 times a 0.25 MP photo).
                prediction = cv2.resize(prediction, (w, h), interpolation=cv2.INTER_AREA)
                small = rgb
            else:
                size = (prediction.shape[1], prediction.shape[0])
                small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
            coefficients = guided_coefficients(small, prediction, params.guide_radius, params.guide_eps, True)
            return apply_coefficients(rgb, coefficients, True)
        # As rembg: the matte goes to 8 bits (truncated), then back to the image's size with the filter.
        matte_8bit = Image.fromarray((prediction * 255).astype(np.uint8))
        return np.asarray(matte_8bit.resize((w, h), self._resample))

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """The model input (1 x 3 x H x W float32): resized, scaled by the image max, normalised."""
        width, height = self.size
        resized = np.asarray(Image.fromarray(rgb).resize((width, height), self._resample), np.float32)
        # rembg divides by the image's own maximum, not by 255; matching it matches what users judge.
        resized = resized / max(float(resized.max()), 1e-6)
        mean = np.asarray(self.convention.mean, np.float32)
        std = np.asarray(self.convention.std, np.float32)
        return np.ascontiguousarray(((resized - mean) / std).transpose(2, 0, 1)[None])

    def postprocess(self, output: np.ndarray) -> np.ndarray:
        """The model's output as a float matte in [0, 1] at the model's resolution, per the convention."""
        prediction = np.asarray(output, np.float32)
        if prediction.ndim < 2:
            raise RemoveBgError(f"{self.model_path} returned a {prediction.shape} output, not an image")
        maps = prediction.reshape(-1, *prediction.shape[-2:])  # one map per channel (the batch is 1)
        if self.convention.output == "foreground classes":
            return (maps.argmax(axis=0) != 0).astype(np.float32)
        prediction = maps[0]
        if self.convention.output == "sigmoid, min-max":
            prediction = (1.0 / (1.0 + np.exp(-prediction))).astype(np.float32)
        low, high = float(prediction.min()), float(prediction.max())
        if high - low < 1e-12:
            return np.zeros_like(prediction)
        return (prediction - low) / (high - low)

    def _choose_preset(self, preset: str | None) -> ModelPreset:
        if preset is not None:
            if preset not in PRESETS:
                raise RemoveBgError(
                    f"unknown model preset {preset!r} for {self.model_path}; "
                    f"choose one of {', '.join(PRESETS)}"
                )
            return PRESETS[preset]
        file_name = self.model_path.name.lower()
        for known in PRESETS.values():
            downloaded_as = known.url.rsplit("/", 1)[-1].lower() if known.url else None
            if file_name in (known.file_name, downloaded_as):
                return known
        for pattern, name in _NAME_PATTERNS:
            if re.search(pattern, file_name):
                return PRESETS[name]
        if self._fixed_size is not None:
            width, height = self._fixed_size
            if width == height and width in _SIZE_PRESETS:
                return PRESETS[_SIZE_PRESETS[width]]
        raise RemoveBgError(
            f"cannot tell which model {self.model_path} is from its file name or input size "
            f"{self._fixed_size}; pass a preset (--model-preset) among {', '.join(PRESETS)}"
        )

    def _used_output_name(self, convention: ModelConvention) -> str:
        outputs = self._session.get_outputs()
        if convention.output_index >= len(outputs):
            raise RemoveBgError(
                f"{self.model_path} has {len(outputs)} output(s); preset {self.preset.name!r} "
                f"reads output number {convention.output_index}"
            )
        name: str = outputs[convention.output_index].name
        return name


def _check_image_input(path: Path, shape: list[Any], dtype: str) -> tuple[int, int] | None:
    """Validate an N x 3 x H x W float input; return its fixed (width, height), or None if dynamic."""
    problem = None
    if len(shape) != 4:
        problem = f"its input has shape {shape}, not N x 3 x H x W"
    elif isinstance(shape[1], int) and shape[1] != 3:
        problem = f"its input has {shape[1]} channels, not 3 (shape {shape})"
    elif dtype not in ("tensor(float)", "tensor(float16)"):
        problem = f"its input is {dtype}, not a float tensor"
    if problem:
        raise RemoveBgError(
            f"{path} is not a usable image model: {problem}; use a U2-Net, IS-Net or BiRefNet .onnx"
        )
    height, width = shape[2], shape[3]
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0:
        return width, height
    return None
