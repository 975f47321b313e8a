"""Background-removal engines: pure functions from an RGB image to an alpha matte."""

from __future__ import annotations

from typing import Literal, Protocol

import numpy as np

Mode = Literal["fast", "precise"]
MODES: tuple[Mode, ...] = ("fast", "precise")


class Engine(Protocol):
    """Turns an RGB image into an alpha matte of the same size."""

    name: str

    def matte(self, rgb: np.ndarray, mode: Mode) -> np.ndarray:
        """Return the alpha matte (H x W, uint8, 255 = foreground) of `rgb` (H x W x 3, uint8)."""
        ...


def get_engine(name: str = "classic", model_path: str | None = None, family: str | None = None) -> Engine:
    """Build the engine called `name`: `classic` (no weights) or `onnx` (needs `model_path`).

    `family` (u2net, isnet, birefnet, bria, ben) overrides the onnx engine's guess of the model's
    pre- and post-processing convention.
    """
    if name == "classic":
        from removebg_provider.engines.classic import ClassicEngine

        return ClassicEngine()
    if name == "onnx":
        if not model_path:
            raise ValueError("the onnx engine needs a model path (--model PATH)")
        from removebg_provider.engines.onnx import OnnxEngine

        return OnnxEngine(model_path, family)
    raise ValueError(f"unknown engine {name!r}; choose 'classic' or 'onnx'")
