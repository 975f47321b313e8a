"""The table of model conventions: each rembg model by name, how to feed it, read it, and where to get it.

Every difference between the models is data in `PRESETS`; `engines.onnx` has one code path for all
of them. The facts (input size, mean and std, resize filter, which output and how it is scaled,
download URL and checksum) are rembg's, as its `rembg/sessions/*.py` pin them (rembg 2.x, 2026), so
a model behaves here as it does in rembg.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RGB = tuple[float, float, float]

IMAGENET_MEAN: RGB = (0.485, 0.456, 0.406)
IMAGENET_STD: RGB = (0.229, 0.224, 0.225)
HALF: RGB = (0.5, 0.5, 0.5)
ONE: RGB = (1.0, 1.0, 1.0)

# How the model's output becomes a matte in [0, 1]:
# - "min-max": channel 0 stretched to [0, 1] over the image (the model outputs probabilities);
# - "sigmoid, min-max": the model outputs logits: sigmoid first, then the stretch;
# - "foreground classes": a class score per channel; foreground is every pixel whose best class is not
#   class 0 (background). u2net_cloth_seg's classes are upper body, lower body and full body clothes.
OutputScaling = Literal["min-max", "sigmoid, min-max", "foreground classes"]
# Pillow's resampling filters (antialiased when shrinking); rembg uses Lanczos for every model.
ResizeFilter = Literal["lanczos", "bicubic", "bilinear", "hamming", "box", "nearest"]

_RELEASES = "https://github.com/danielgatis/rembg/releases/download/v0.0.0"


@dataclass(frozen=True)
class ModelConvention:
    """How a model wants its input prepared and its output read.

    The input is the image resized to `size` x `size` with `resize_filter`, divided by its own maximum
    value (as rembg does, not by 255), then normalised per channel: (x - mean) / std. The matte is
    output number `output_index`, scaled as `output` says, and resized back to the image with the
    same filter.
    """

    size: int  # square input side, used when the model file does not fix its own
    mean: RGB
    std: RGB
    resize_filter: ResizeFilter = "lanczos"
    output_index: int = 0
    output: OutputScaling = "min-max"


@dataclass(frozen=True)
class ModelPreset:
    """A model known by name: its family, its convention and, if it has one, its public download."""

    name: str
    family: str  # the architecture: u2net, isnet, birefnet, bria, ben
    convention: ModelConvention
    summary: str
    url: str | None = None  # None: no public download, pass the path of your own file
    checksum: str | None = None  # "<hashlib algorithm>:<hex digest>" of the file at `url`

    @property
    def file_name(self) -> str:
        """The file's name in the model cache, the same as in rembg's ~/.u2net."""
        return f"{self.name}.onnx"


U2NET = ModelConvention(320, IMAGENET_MEAN, IMAGENET_STD)
U2NET_CLOTH = ModelConvention(768, IMAGENET_MEAN, IMAGENET_STD, output="foreground classes")
ISNET_GENERAL = ModelConvention(1024, HALF, ONE)
ISNET_ANIME = ModelConvention(1024, IMAGENET_MEAN, ONE)
BIREFNET = ModelConvention(1024, IMAGENET_MEAN, IMAGENET_STD, output="sigmoid, min-max")
BRIA = ModelConvention(1024, IMAGENET_MEAN, IMAGENET_STD)
BEN = ModelConvention(1024, HALF, ONE)

_PRESET_LIST = (
    ModelPreset(
        "u2net",
        "u2net",
        U2NET,
        "U2-Net, general salient objects (rembg's default)",
        f"{_RELEASES}/u2net.onnx",
        "md5:60024c5c889badc19c04ad937298a77b",
    ),
    ModelPreset(
        "u2netp",
        "u2net",
        U2NET,
        "U2-Net, lightweight version",
        f"{_RELEASES}/u2netp.onnx",
        "md5:8e83ca70e441ab06c318d82300c84806",
    ),
    ModelPreset(
        "u2net_human_seg",
        "u2net",
        U2NET,
        "U2-Net trained for people",
        f"{_RELEASES}/u2net_human_seg.onnx",
        "md5:c09ddc2e0104f800e3e1bb4652583d1f",
    ),
    ModelPreset(
        "u2net_cloth_seg",
        "u2net",
        U2NET_CLOTH,
        "U2-Net for clothes on people: keeps all clothes (upper, lower, full body)",
        f"{_RELEASES}/u2net_cloth_seg.onnx",
        "md5:2434d1f3cb744e0e49386c906e5a08bb",
    ),
    ModelPreset(
        "silueta",
        "u2net",
        U2NET,
        "U2-Net reduced to 43 MB",
        f"{_RELEASES}/silueta.onnx",
        "md5:55e59e0d8062d2f5d013f4725ee84782",
    ),
    ModelPreset(
        "isnet-general-use",
        "isnet",
        ISNET_GENERAL,
        "IS-Net (DIS), general use",
        f"{_RELEASES}/isnet-general-use.onnx",
        "md5:fc16ebd8b0c10d971d3513d564d01e29",
    ),
    ModelPreset(
        "isnet-anime",
        "isnet",
        ISNET_ANIME,
        "IS-Net for anime characters",
        f"{_RELEASES}/isnet-anime.onnx",
        "md5:6f184e756bb3bd901c8849220a83e38e",
    ),
    ModelPreset(
        "birefnet-general",
        "birefnet",
        BIREFNET,
        "BiRefNet, general use",
        f"{_RELEASES}/BiRefNet-general-epoch_244.onnx",
        "md5:7a35a0141cbbc80de11d9c9a28f52697",
    ),
    ModelPreset(
        "birefnet-general-lite",
        "birefnet",
        BIREFNET,
        "BiRefNet, general use, Swin-Tiny backbone (lighter)",
        f"{_RELEASES}/BiRefNet-general-bb_swin_v1_tiny-epoch_232.onnx",
        "md5:4fab47adc4ff364be1713e97b7e66334",
    ),
    ModelPreset(
        "birefnet-portrait",
        "birefnet",
        BIREFNET,
        "BiRefNet for portraits",
        f"{_RELEASES}/BiRefNet-portrait-epoch_150.onnx",
        "md5:c3a64a6abf20250d090cd055f12a3b67",
    ),
    ModelPreset(
        "birefnet-dis",
        "birefnet",
        BIREFNET,
        "BiRefNet for dichotomous image segmentation (DIS5K)",
        f"{_RELEASES}/BiRefNet-DIS-epoch_590.onnx",
        "md5:2d4d44102b446f33a4ebb2e56c051f2b",
    ),
    ModelPreset(
        "birefnet-hrsod",
        "birefnet",
        BIREFNET,
        "BiRefNet for high-resolution salient objects",
        f"{_RELEASES}/BiRefNet-HRSOD_DHU-epoch_115.onnx",
        "md5:c017ade5de8a50ff0fd74d790d268dda",
    ),
    ModelPreset(
        "birefnet-cod",
        "birefnet",
        BIREFNET,
        "BiRefNet for concealed (camouflaged) objects",
        f"{_RELEASES}/BiRefNet-COD-epoch_125.onnx",
        "md5:f6d0d21ca89d287f17e7afe9f5fd3b45",
    ),
    ModelPreset(
        "birefnet-massive",
        "birefnet",
        BIREFNET,
        "BiRefNet trained on a massive dataset",
        f"{_RELEASES}/BiRefNet-massive-TR_DIS5K_TR_TEs-epoch_420.onnx",
        "md5:33e726a2136a3d59eb0fdf613e31e3e9",
    ),
    ModelPreset(
        "bria-rmbg",
        "bria",
        BRIA,
        "BRIA RMBG 2.0 (check BRIA's licence before commercial use)",
        f"{_RELEASES}/bria-rmbg-2.0.onnx",
        "sha256:5b486f08200f513f460da46dd701db5fbb47d79b4be4b708a19444bcd4e79958",
    ),
    ModelPreset("ben", "ben", BEN, "BEN / BEN2 (rembg's ben_custom): your own file, no public download"),
)

PRESETS: dict[str, ModelPreset] = {preset.name: preset for preset in _PRESET_LIST}
