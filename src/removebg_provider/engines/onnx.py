"""The model engine: runs a user-supplied rembg-style ONNX salient-object or matting model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from removebg_provider.engines import MODES, Mode
from removebg_provider.engines._guided import apply_coefficients, guided_coefficients
from removebg_provider.errors import RemoveBgError

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConvention:
    """How a model family wants its input prepared and its output read (as in rembg's sessions)."""

    family: str
    size: int  # square input side used when the model does not fix its own
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sigmoid: bool  # the output is logits


CONVENTIONS: dict[str, ModelConvention] = {
    "u2net": ModelConvention("u2net", 320, _IMAGENET_MEAN, _IMAGENET_STD, sigmoid=False),
    "isnet": ModelConvention("isnet", 1024, _IMAGENET_MEAN, (1.0, 1.0, 1.0), sigmoid=False),
    "birefnet": ModelConvention("birefnet", 1024, _IMAGENET_MEAN, _IMAGENET_STD, sigmoid=True),
    "bria": ModelConvention("bria", 1024, _IMAGENET_MEAN, _IMAGENET_STD, sigmoid=False),
    "ben": ModelConvention("ben", 1024, (0.5, 0.5, 0.5), (1.0, 1.0, 1.0), sigmoid=False),
}

# File-name patterns of the models rembg users keep in ~/.u2net, checked in order.
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"birefnet", "birefnet"),
    (r"isnet|dis[-_]", "isnet"),
    (r"bria|rmbg", "bria"),
    (r"(^|[-_])ben(\d|[-_.]|$)", "ben"),
    (r"u2net|silueta", "u2net"),
)

# Square input sides that identify a family when neither the caller nor the file name does.
_SIZE_FAMILIES = {320: "u2net", 1024: "isnet"}


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

    The convention comes from `family` if given, else from the file name, else from the model's
    input size. Takes RGB only (H x W x 3 uint8); callers convert grayscale or RGBA first.
    """

    name = "onnx"

    def __init__(self, model_path: str | Path, family: str | None = None) -> None:
        import onnxruntime as ort

        self.model_path = Path(model_path).expanduser()
        if not self.model_path.is_file():
            raise RemoveBgError(
                f"ONNX model file {self.model_path} does not exist; pass the path of a .onnx file"
            )
        try:
            self._session = ort.InferenceSession(str(self.model_path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises several unrelated types for unreadable models
            raise RemoveBgError(
                f"cannot load {self.model_path} as an ONNX model ({exc}); "
                "check that the file is a complete .onnx"
            ) from exc
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self._fixed_size = _check_image_input(self.model_path, model_input.shape, model_input.type)
        self._input_dtype = np.float16 if model_input.type == "tensor(float16)" else np.float32
        self.convention = self._choose_convention(family)
        self.size = self._fixed_size or (self.convention.size, self.convention.size)

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
        output = self._session.run(None, {self._input_name: self.preprocess(rgb).astype(self._input_dtype)})[
            0
        ]
        prediction = self.postprocess(np.asarray(output))
        h, w = rgb.shape[:2]
        if params.refine_edges:
            small = cv2.resize(rgb, (prediction.shape[1], prediction.shape[0]), interpolation=cv2.INTER_AREA)
            coefficients = guided_coefficients(small, prediction, params.guide_radius, params.guide_eps, True)
            return apply_coefficients(rgb, coefficients, True)
        resized = cv2.resize(prediction, (w, h), interpolation=cv2.INTER_LANCZOS4)
        return np.clip(resized * 255 + 0.5, 0, 255).astype(np.uint8)

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """The model input (1 x 3 x H x W float32): Lanczos-resized, scaled by the image max, normalised."""
        width, height = self.size
        resized = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_LANCZOS4).astype(np.float32)
        # rembg divides by the image's own maximum, not by 255; matching it matches the training setup.
        resized /= max(float(resized.max()), 1e-6)
        mean = np.asarray(self.convention.mean, np.float32)
        std = np.asarray(self.convention.std, np.float32)
        return np.ascontiguousarray(((resized - mean) / std).transpose(2, 0, 1)[None])

    def postprocess(self, output: np.ndarray) -> np.ndarray:
        """First output channel as a float matte in [0, 1]: sigmoid if logits, then min-max stretched."""
        prediction = output.astype(np.float32)
        while prediction.ndim > 2:
            prediction = prediction[0]
        if self.convention.sigmoid:
            prediction = (1.0 / (1.0 + np.exp(-prediction))).astype(np.float32)
        low, high = float(prediction.min()), float(prediction.max())
        if high - low < 1e-12:
            return np.zeros_like(prediction)
        return (prediction - low) / (high - low)

    def _choose_convention(self, family: str | None) -> ModelConvention:
        if family is not None:
            if family not in CONVENTIONS:
                raise RemoveBgError(
                    f"unknown model family {family!r} for {self.model_path}; "
                    f"choose one of {', '.join(CONVENTIONS)}"
                )
            return CONVENTIONS[family]
        stem = self.model_path.name.lower()
        for pattern, name in _NAME_PATTERNS:
            if re.search(pattern, stem):
                return CONVENTIONS[name]
        if self._fixed_size is not None:
            width, height = self._fixed_size
            if width == height and width in _SIZE_FAMILIES:
                return CONVENTIONS[_SIZE_FAMILIES[width]]
        raise RemoveBgError(
            f"cannot tell which model family {self.model_path} belongs to from its name or input size "
            f"{self._fixed_size}; pass family= one of {', '.join(CONVENTIONS)}"
        )


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
