"""`removebg serve --model NAME|PATH` and per-mode engines, reported by `GET /health`."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from removebg_provider.cli import main
from removebg_provider.engines import get_engine
from removebg_provider.errors import RemoveBgError
from removebg_provider.server import ServerSettings
from support import REPO_ROOT
from support.onnx_models import dynamic, save_model
from support.servers import start_api_server

REPO = REPO_ROOT


def test_help_documents_the_model_and_per_mode_engine_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])

    text = capsys.readouterr().out
    for option in (
        "--fast-engine",
        "--precise-engine",
        "--model NAME|PATH",
        "--model-preset",
        "--model-home",
    ):
        assert option in text
    assert "--pull" in text


def test_serve_runs_classic_for_fast_and_onnx_for_precise_and_health_says_so(tmp_path: Path) -> None:
    model = dynamic(tmp_path / "isnet-general-use.onnx")
    port = _free_port()
    command = [
        *("serve", "--port", str(port), "--storage", str(tmp_path / "files")),
        *("--fast-engine", "classic", "--precise-engine", "onnx", "--model", str(model)),
    ]
    process = _start_cli(command)
    try:
        health = _wait_for_health(process, f"http://127.0.0.1:{port}").json()
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)

    assert health["engine"] == "mixed"
    assert health["engines"] == {
        "fast": {"engine": "classic"},
        "precise": {"engine": "onnx", "model": "isnet-general-use.onnx", "preset": "isnet-general-use"},
    }


def test_each_mode_is_cut_by_its_own_engine(tmp_path: Path) -> None:
    # The model's matte is the red channel: on a white backdrop with a dark product it keeps the
    # backdrop, the opposite of the classic engine, so the two modes' mattes tell which engine ran.
    model = dynamic(tmp_path / "u2net.onnx")
    photo = _photo_of_a_dark_square()
    with start_api_server(tmp_path, fast_engine="classic", precise_engine="onnx", model=str(model)) as server:
        alphas = {
            mode: _alpha_of(server.base_url, server.auth_headers(), mode, photo)
            for mode in ("fast", "precise")
        }

    assert alphas["fast"][48, 64] > 200
    assert alphas["fast"][4, 4] < 50
    assert alphas["precise"][48, 64] < 50
    assert alphas["precise"][4, 4] > 200


def test_serve_model_name_uses_the_file_in_the_cache(tmp_path: Path) -> None:
    home = tmp_path / "cache"
    home.mkdir()
    save_model(home / "u2netp.onnx", ["n", 3, "h", "w"])
    port = _free_port()
    command = ["serve", "--port", str(port), "--storage", str(tmp_path / "files")]
    process = _start_cli([*command, "--model", "u2netp", "--model-home", str(home)])
    try:
        health = _wait_for_health(process, f"http://127.0.0.1:{port}").json()
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)

    assert health["engine"] == "onnx"
    assert health["engines"]["fast"] == {"engine": "onnx", "model": "u2netp.onnx", "preset": "u2netp"}


def test_serve_model_name_not_downloaded_exits_2_saying_how_to_get_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code = main(["serve", "--model", "u2net", "--model-home", str(tmp_path), "--storage", str(tmp_path)])

    assert code == 2
    errors = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert len(errors) == 1
    assert "model 'u2net' is not downloaded" in errors[0]
    assert "run `removebg models pull u2net` or add --pull" in errors[0]
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded


def test_serve_pull_offline_exits_2_naming_the_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("REMOVEBG_MODEL_MIRROR", mirror)
    home = tmp_path / "cache"

    code = main(
        ["serve", "--model", "u2net", "--pull", "--model-home", str(home), "--storage", str(tmp_path)]
    )

    assert code == 2
    assert f"cannot download {mirror}/u2net.onnx (Connection refused)" in caplog.text
    assert f"place it at {home / 'u2net.onnx'}" in caplog.text


def test_the_onnx_engine_without_a_model_is_refused() -> None:
    with pytest.raises(ValueError, match="the onnx engine needs a model"):
        ServerSettings(precise_engine="onnx")


def test_a_model_that_no_mode_uses_is_refused() -> None:
    with pytest.raises(ValueError, match="no mode uses the onnx engine"):
        ServerSettings(engine="classic", model="u2net")


def test_a_model_alone_means_the_onnx_engine_for_both_modes() -> None:
    assert ServerSettings(model="u2net").engine_names == {"fast": "onnx", "precise": "onnx"}
    assert ServerSettings(model="u2net", fast_engine="classic").engine_names == {
        "fast": "classic",
        "precise": "onnx",
    }


def test_get_engine_refuses_a_model_name_that_is_not_in_the_cache(tmp_path: Path) -> None:
    with pytest.raises(RemoveBgError, match=r"'silueta' is not downloaded .*silueta\.onnx does not exist"):
        get_engine("onnx", "silueta", model_home=tmp_path)


def test_a_model_that_is_neither_a_file_nor_a_name_is_refused_listing_the_names(tmp_path: Path) -> None:
    with pytest.raises(RemoveBgError, match=r"'isnet' is neither a file nor a model name; names: u2net, "):
        get_engine("onnx", "isnet", model_home=tmp_path)


def test_a_named_model_runs_with_its_own_preset_whatever_its_file_looks_like(tmp_path: Path) -> None:
    save_model(tmp_path / "isnet-anime.onnx", [1, 3, 320, 320])  # a size that alone would mean u2net
    engine = get_engine("onnx", "isnet-anime", model_home=tmp_path)
    assert getattr(engine, "details", {})["preset"] == "isnet-anime"


def _photo_of_a_dark_square() -> bytes:
    pixels = np.full((96, 128, 3), 245, np.uint8)
    pixels[28:68, 44:84] = (20, 30, 120)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _alpha_of(base_url: str, headers: dict[str, str], mode: str, photo: bytes) -> np.ndarray:
    body = {"records": [{"_base64": base64.b64encode(photo).decode()}]}
    answer = requests.post(f"{base_url}/removebg/{mode}/removebg", json=body, headers=headers, timeout=60)
    record = answer.json()["records"][0]
    assert record["_status"]["code"] == 200, record
    cutout = requests.get(record["_output_url"], timeout=30)
    return np.asarray(Image.open(io.BytesIO(cutout.content)).convert("RGBA"))[..., 3]


def _start_cli(arguments: list[str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("REMOVEBG_SERVER_TOKEN", None)
    entry_point = "import sys; from removebg_provider.cli import main; sys.exit(main())"
    return subprocess.Popen(
        [sys.executable, "-c", entry_point, *arguments],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_health(process: subprocess.Popen[bytes], base_url: str) -> requests.Response:
    deadline = time.monotonic() + 120
    while True:
        try:
            return requests.get(f"{base_url}/health", timeout=2)
        except requests.ConnectionError:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                raise AssertionError(f"serve exited with {process.returncode}:\n{output}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
