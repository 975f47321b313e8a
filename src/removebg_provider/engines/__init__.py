"""Background-removal engines: pure functions from an RGB image to an alpha matte."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from removebg_provider.vocabulary import MODES, Mode

__all__ = ["ENGINE_NAMES", "MODES", "Engine", "Mode", "engine_details", "get_engine", "get_engines"]
ENGINE_NAMES = ("classic", "onnx")


class Engine(Protocol):
    """Turns an RGB image into an alpha matte of the same size."""

    name: str

    def matte(self, rgb: np.ndarray, mode: Mode) -> np.ndarray:
        """Return the alpha matte (H x W, uint8, 255 = foreground) of `rgb` (H x W x 3, uint8)."""
        ...


def get_engine(
    name: str = "classic",
    model: str | None = None,
    preset: str | None = None,
    model_home: Path | None = None,
) -> Engine:
    """Build the engine called `name`: `classic` (no weights) or `onnx` (needs `model`).

    `model` is a model name from `presets.PRESETS` (its file must be in the cache at `model_home`,
    see `model_store.model_home`) or the path of a .onnx file. `preset` overrides the conventions
    the name implies or the onnx engine guesses from a file's name.
    """
    if name == "classic":
        from removebg_provider.engines.classic import ClassicEngine

        return ClassicEngine()
    if name == "onnx":
        if not model:
            raise ValueError("the onnx engine needs a model: --model NAME or --model PATH")
        from removebg_provider.engines.model_store import model_home as default_home
        from removebg_provider.engines.model_store import resolve_model
        from removebg_provider.engines.onnx import OnnxEngine

        resolved = resolve_model(model, model_home or default_home())
        return OnnxEngine(resolved.path, preset or resolved.preset)
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")


def get_engines(
    names: Mapping[Mode, str],
    model: str | None = None,
    preset: str | None = None,
    model_home: Path | None = None,
) -> dict[Mode, Engine]:
    """One engine per mode, as `names` says; modes that name the same engine share one instance."""
    built: dict[str, Engine] = {}
    for name in dict.fromkeys(names.values()):
        built[name] = get_engine(name, model, preset, model_home)
    return {mode: built[names[mode]] for mode in MODES}


def engine_details(engine: Engine) -> dict[str, str]:
    """What `GET /health` says about an engine: its name, plus what a model engine adds (model, preset)."""
    details: dict[str, str] = {"engine": engine.name}
    details.update(getattr(engine, "details", {}))
    return details
