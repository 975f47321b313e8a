"""Measure the ONNX engine's CPU cost per image and per megapixel for each model family, on one core.

Run: PYTHONPATH=src .venv/bin/python benchmarks/onnx_cost.py [--families u2netp u2net isnet birefnet]
     [--sizes 0.25 1 4 12] [--repeats 3]

No real weights can be downloaded here, so the models are generated:
- u2netp, u2net, u2net_cloth_seg and isnet are the published architectures (U^2-Net, U^2-Net-P and
  IS-Net DIS: every convolution, dilation, pooling, upsampling and side output, batch norm folded into
  the convolutions) with random weights: the same arithmetic as the real files, so the same CPU cost,
  but mattes that mean nothing;
- birefnet, bria and ben are graphs with only the family's input and output shapes (a 1x1 convolution
  in between): they measure the engine's own work around the network (resizing, normalising, scaling,
  edge refinement), not the network, which is far larger (a Swin transformer backbone).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from removebg_provider.engines import MODES
from removebg_provider.engines._guided import apply_coefficients, guided_coefficients
from removebg_provider.engines.onnx import ONNX_MODE_PARAMS, OnnxEngine
from removebg_provider.samples import make_product_photo

# (blocks, in, mid, out) per stage, as in U^2-Net's model/u2net.py; 0 blocks = RSU-4F.
U2NET_ENCODER = ((7, 3, 32, 64), (6, 64, 32, 128), (5, 128, 64, 256), (4, 256, 128, 512), (0, 512, 256, 512))
U2NET_DECODER = (
    (0, 1024, 256, 512),
    (4, 1024, 128, 256),
    (5, 512, 64, 128),
    (6, 256, 32, 64),
    (7, 128, 16, 64),
)
U2NETP_ENCODER = ((7, 3, 16, 64), (6, 64, 16, 64), (5, 64, 16, 64), (4, 64, 16, 64), (0, 64, 16, 64))
U2NETP_DECODER = ((0, 128, 16, 64), (4, 128, 16, 64), (5, 128, 16, 64), (6, 128, 16, 64), (7, 128, 16, 64))
ISNET_ENCODER = ((7, 64, 32, 64), *U2NET_ENCODER[1:])  # after a stride-2 input convolution


@dataclass(frozen=True)
class Family:
    """One family to measure: the preset it runs with, and how its stand-in model is made."""

    label: str
    preset: str
    side: int
    faithful: bool  # the published architecture (True) or only its input and output shapes
    build: Callable[[int], onnx.ModelProto]


def main() -> int:
    families = {family.preset.split("-")[0]: family for family in FAMILIES}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(families), choices=list(families))
    parser.add_argument(
        "--sizes",
        nargs="*",
        type=float,
        default=[0.25, 1.0, 4.0, 12.0],
        help="megapixels (none: network only)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case, median kept")
    args = parser.parse_args()
    cv2.setNumThreads(1)  # with one onnxruntime thread: every figure is the cost on one core
    print(f"command: PYTHONPATH=src {sys.executable} {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cores; load average before: {_load()}\n")
    photos = {mp: _photo(mp) for mp in args.sizes}
    print("| family | model | outputs fetched | MiB handed to Python | network CPU s | network wall s |")
    print("|---|---|---|---:|---:|---:|")
    matte_rows: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        for key in args.families:
            family = families[key]
            path = Path(folder) / f"{family.preset}.onnx"
            onnx.save(family.build(family.side), str(path))
            engine = OnnxEngine(path, family.preset, threads=1)
            kind = "published architecture, random weights" if family.faithful else "shapes only"
            _network_rows(path, engine, family, kind, args.repeats)
            for rgb in photos.values():
                for mode in MODES:
                    cpu, wall = _median_cost(
                        lambda e=engine, rgb=rgb, mode=mode: e.matte(rgb, mode), args.repeats
                    )
                    megapixels = rgb.shape[0] * rgb.shape[1] / 1e6
                    matte_rows.append(
                        f"| {family.label} | {mode} | {megapixels:.2f} | {cpu:.3f} | {cpu / megapixels:.3f} "
                        f"| {wall:.3f} |"
                    )
    if photos:
        print("\n| family | mode | image MP | CPU s per image | CPU s per MP | wall s per image |")
        print("|---|---|---:|---:|---:|---:|")
        print("\n".join(matte_rows))
        _before_and_now_rows(photos, args.repeats)
    print(f"\nload average after: {_load()}")
    return 0


def _network_rows(path: Path, engine: OnnxEngine, family: Family, kind: str, repeats: int) -> None:
    """The network alone, fetching only the output the preset reads, then every output (as before)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as the engine above: cost per core
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: engine.preprocess(_photo(0.25))}
    used = [session.get_outputs()[engine.convention.output_index].name]
    count = len(session.get_outputs())
    for fetched, names in ((f"1 of {count}", used), (f"all {count}", None)):
        mib = sum(np.asarray(output).nbytes for output in session.run(names, feed)) / 2**20
        cpu, wall = _median_cost(lambda names=names: session.run(names, feed), repeats)
        print(f"| {family.label} | {kind} | {fetched} | {mib:.1f} | {cpu:.3f} | {wall:.3f} |")


def _before_and_now_rows(photos: dict[float, np.ndarray], repeats: int) -> None:
    """The steps this version changed around a 1024 x 1024 model, timed the old way and the new way."""
    print("\n| image MP | step | before, CPU s | now, CPU s |")
    print("|---:|---|---:|---:|")
    matte = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
    for rgb in photos.values():
        height, width = rgb.shape[:2]
        steps = {
            "shrink the photo to 1024 x 1024: OpenCV Lanczos-4 before, Pillow Lanczos (rembg's) now": (
                lambda rgb=rgb: cv2.resize(rgb, (1024, 1024), interpolation=cv2.INTER_LANCZOS4),
                lambda rgb=rgb: Image.fromarray(rgb).resize((1024, 1024), Image.Resampling.LANCZOS),
            ),
            "enlarge the matte (fast): OpenCV Lanczos-4 on floats before, Pillow Lanczos on 8 bits now": (
                lambda w=width, h=height: cv2.resize(matte, (w, h), interpolation=cv2.INTER_LANCZOS4),
                lambda w=width, h=height: Image.fromarray((matte * 255).astype(np.uint8)).resize(
                    (w, h), Image.Resampling.LANCZOS
                ),
            ),
            "refine edges (precise): fitted at 1024 x 1024 before, at the smaller of photo and matte now": (
                lambda rgb=rgb: _refine(rgb, matte, at_photo_size=False),
                lambda rgb=rgb, smaller=height * width <= matte.size: _refine(rgb, matte, smaller),
            ),
        }
        for step, (before, now) in steps.items():
            cost_before = _median_cost(before, repeats)[0]
            cost_now = _median_cost(now, repeats)[0]
            print(f"| {width * height / 1e6:.2f} | {step} | {cost_before:.3f} | {cost_now:.3f} |")


def _refine(rgb: np.ndarray, matte: np.ndarray, at_photo_size: bool) -> np.ndarray:
    """The precise mode's guided filter, fitted at the photo's size or at the matte's."""
    height, width = rgb.shape[:2]
    if at_photo_size:
        guide, fitted = rgb, cv2.resize(matte, (width, height), interpolation=cv2.INTER_AREA)
    else:
        guide, fitted = cv2.resize(rgb, matte.shape[::-1], interpolation=cv2.INTER_AREA), matte
    precise = ONNX_MODE_PARAMS["precise"]
    coefficients = guided_coefficients(guide, fitted, precise.guide_radius, precise.guide_eps, True)
    return apply_coefficients(rgb, coefficients, True)


def _median_cost(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median CPU seconds (every thread of the process) and wall seconds of `call`, after a warm-up."""
    call()
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(repeats):
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        call()
        cpu.append(time.process_time() - started_cpu)
        wall.append(time.perf_counter() - started_wall)
    return statistics.median(cpu), statistics.median(wall)


def _photo(megapixels: float) -> np.ndarray:
    width = int(math.sqrt(megapixels * 1e6 * 4 / 3))
    height = int(width * 3 / 4)
    return make_product_photo(11, width, height, product="bottle", background="white").rgb


def _load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


class _Graph:
    """Builds an ONNX graph layer by layer, tracking each tensor's (channels, height, width)."""

    def __init__(self, side: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, int, int]] = {"image": (3, side, side)}
        self.rng = np.random.default_rng(0)

    def _new(self, op: str, inputs: list[str], shape: tuple[int, int, int], **attributes: object) -> str:
        name = f"t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [name], **attributes))
        self.shapes[name] = shape
        return name

    def _constant(self, array: np.ndarray) -> str:
        name = f"w{len(self.weights)}"
        self.weights.append(numpy_helper.from_array(array, name))
        return name

    def conv(
        self, x: str, out: int, kernel: int = 3, dilation: int = 1, stride: int = 1, relu: bool = True
    ) -> str:
        channels, height, width = self.shapes[x]
        scale = math.sqrt(2.0 / (channels * kernel * kernel))
        weight = self._constant(
            (self.rng.standard_normal((out, channels, kernel, kernel)) * scale).astype(np.float32)
        )
        bias = self._constant(np.zeros(out, np.float32))
        pad = dilation * (kernel // 2)
        shape = (
            out,
            (height + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1,
            (width + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1,
        )
        y = self._new(
            "Conv", [x, weight, bias], shape, pads=[pad] * 4, dilations=[dilation] * 2, strides=[stride] * 2
        )
        return self._new("Relu", [y], shape) if relu else y

    def pool(self, x: str) -> str:
        channels, height, width = self.shapes[x]
        shape = (channels, math.ceil(height / 2), math.ceil(width / 2))
        return self._new("MaxPool", [x], shape, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)

    def resize(self, x: str, height: int, width: int) -> str:
        channels = self.shapes[x][0]
        if self.shapes[x][1:] == (height, width):
            return x
        sizes = self._constant(np.array([1, channels, height, width], np.int64))
        return self._new("Resize", [x, "", "", sizes], (channels, height, width), mode="linear")

    def concat(self, a: str, b: str) -> str:
        shape = (self.shapes[a][0] + self.shapes[b][0], *self.shapes[a][1:])
        return self._new("Concat", [a, b], shape, axis=1)

    def add(self, a: str, b: str) -> str:
        return self._new("Add", [a, b], self.shapes[a])

    def sigmoid(self, x: str) -> str:
        return self._new("Sigmoid", [x], self.shapes[x])

    def rsu(self, x: str, blocks: int, mid: int, out: int) -> str:
        """A residual U-block: RSU-7/6/5/4 (`blocks`), or RSU-4F (0: dilations instead of pooling)."""
        top = self.conv(x, out)
        if blocks == 0:
            encoder = [self.conv(top, mid)]
            for dilation in (2, 4):
                encoder.append(self.conv(encoder[-1], mid, dilation=dilation))
            decoded = self.conv(encoder[-1], mid, dilation=8)
            for skip, dilation in zip(reversed(encoder), (4, 2, 1), strict=True):
                decoded = self.conv(
                    self.concat(decoded, skip), out if skip == encoder[0] else mid, dilation=dilation
                )
            return self.add(decoded, top)
        encoder = [self.conv(top, mid)]
        for _ in range(2, blocks):
            encoder.append(self.conv(self.pool(encoder[-1]), mid))
        decoded = self.conv(self.concat(self.conv(encoder[-1], mid, dilation=2), encoder[-1]), mid)
        for skip in reversed(encoder[:-1]):
            up = self.resize(decoded, *self.shapes[skip][1:])
            decoded = self.conv(self.concat(up, skip), out if skip == encoder[0] else mid)
        return self.add(decoded, top)

    def u_net(
        self,
        x: str,
        encoder: tuple[tuple[int, int, int, int], ...],
        decoder: tuple[tuple[int, int, int, int], ...],
    ) -> tuple[list[str], list[str]]:
        """The U^2 encoder (plus a last RSU-4F stage) and decoder; returns (encoder, decoder) outputs."""
        stages: list[str] = []
        for blocks, _, mid, out in (*encoder, encoder[-1]):
            stages.append(self.rsu(self.pool(stages[-1]) if stages else x, blocks, mid, out))
        decoded = stages[-1]
        decoders: list[str] = []
        for (blocks, _, mid, out), skip in zip(decoder, reversed(stages[:-1]), strict=True):
            up = self.resize(decoded, *self.shapes[skip][1:])
            decoded = self.rsu(self.concat(up, skip), blocks, mid, out)
            decoders.append(decoded)
        return stages, decoders

    def model(self, outputs: list[str]) -> onnx.ModelProto:
        side = self.shapes["image"][1]
        graph = helper.make_graph(
            self.nodes,
            "generated",
            [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, side, side])],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
            initializer=self.weights,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        return model


def u2net(
    side: int,
    encoder: tuple[tuple[int, int, int, int], ...] = U2NET_ENCODER,
    decoder: tuple[tuple[int, int, int, int], ...] = U2NET_DECODER,
    classes: int = 1,
) -> onnx.ModelProto:
    """U^2-Net: seven sigmoid outputs at the input's size, the fused one first."""
    graph = _Graph(side)
    stages, decoders = graph.u_net("image", encoder, decoder)
    sides = [graph.conv(name, classes, relu=False) for name in (*reversed(decoders), stages[-1])]
    sides = [graph.resize(name, side, side) for name in sides]
    fused = sides[0]
    for name in sides[1:]:
        fused = graph.concat(fused, name)
    fused = graph.conv(fused, classes, kernel=1, relu=False)
    return graph.model([graph.sigmoid(name) for name in (fused, *sides)])


def isnet(side: int) -> onnx.ModelProto:
    """IS-Net DIS: six sigmoid side outputs at the input's size, then its six feature maps (12 outputs)."""
    graph = _Graph(side)
    first = graph.conv("image", 64, stride=2, relu=False)
    stages, decoders = graph.u_net(first, ISNET_ENCODER, U2NET_DECODER)
    features = [*reversed(decoders), stages[-1]]
    sides = [graph.resize(graph.conv(name, 1, relu=False), side, side) for name in features]
    return graph.model([graph.sigmoid(name) for name in sides] + features)


def shapes_only(side: int) -> onnx.ModelProto:
    """Input 1 x 3 x side x side to output 1 x 1 x side x side through one 1x1 convolution."""
    graph = _Graph(side)
    return graph.model([graph.conv("image", 1, kernel=1, relu=False)])


FAMILIES = (
    Family("u2netp", "u2netp", 320, True, lambda side: u2net(side, U2NETP_ENCODER, U2NETP_DECODER)),
    Family("u2net, u2net_human_seg", "u2net", 320, True, u2net),
    Family("u2net_cloth_seg", "u2net_cloth_seg", 768, True, lambda side: u2net(side, classes=4)),
    Family("isnet-general-use, isnet-anime", "isnet-general-use", 1024, True, isnet),
    Family("birefnet-* (shapes only)", "birefnet-general", 1024, False, shapes_only),
    Family("bria-rmbg (shapes only)", "bria-rmbg", 1024, False, shapes_only),
)


if __name__ == "__main__":
    sys.exit(main())
