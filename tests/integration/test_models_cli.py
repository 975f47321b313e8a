"""`removebg models list` and `removebg models path`: what is known by name, where its file lives."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from removebg_provider.cli import main
from removebg_provider.engines.model_store import model_home
from removebg_provider.engines.presets import PRESETS

RELEASES = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/"


@pytest.fixture(autouse=True)
def no_cache_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMOVEBG_MODEL_HOME", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)


def test_the_cache_is_under_the_users_cache_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert model_home() == tmp_path / ".cache" / "removebg" / "models"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_home() == tmp_path / "xdg" / "removebg" / "models"

    monkeypatch.setenv("REMOVEBG_MODEL_HOME", str(tmp_path / "env"))
    assert model_home() == tmp_path / "env"
    assert model_home(tmp_path / "flag") == tmp_path / "flag"


def test_list_shows_every_model_with_its_input_and_which_are_downloaded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "isnet-general-use.onnx").write_bytes(b"placed by hand")

    code = main(["models", "list", "--model-home", str(tmp_path)])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[0] == f"model cache: {tmp_path}"
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == set(PRESETS)
    assert rows["isnet-general-use"][1:5] == ["isnet", "1024x1024", "min-max", "yes"]
    assert rows["u2netp"][1:5] == ["u2net", "320x320", "min-max", "-"]
    assert rows["birefnet-general"][2:5] == ["1024x1024", "sigmoid,", "min-max"]
    assert rows["ben"][4:6] == ["own", "file"]


def test_path_prints_where_a_downloaded_model_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "u2net.onnx").write_bytes(b"placed by hand")

    code = main(["models", "path", "u2net", "--model-home", str(tmp_path)])

    assert code == 0
    assert capsys.readouterr().out == f"{tmp_path / 'u2net.onnx'}\n"


def test_path_of_a_model_not_downloaded_yet_exits_1_and_says_how(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMOVEBG_MODEL_HOME", str(tmp_path))

    code = main(["models", "path", "birefnet-general"])

    captured = capsys.readouterr()
    assert code == 1
    assert captured.out == f"{tmp_path / 'birefnet-general.onnx'}\n"
    assert captured.err == "not downloaded yet: removebg models pull birefnet-general\n"


def test_an_unknown_model_name_exits_2_listing_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["models", "path", "u3net"])

    err = capsys.readouterr().err
    assert code == 2
    assert "unknown model 'u3net'; choose one of u2net, u2netp," in err


def test_every_download_is_a_rembg_release_file_with_a_well_formed_checksum() -> None:
    for preset in PRESETS.values():
        if preset.url is None:
            assert preset.name == "ben"  # rembg has no download for it either (ben_custom)
            continue
        assert preset.url.startswith(RELEASES)
        algorithm, _, digest = str(preset.checksum).partition(":")
        assert len(digest) == hashlib.new(algorithm).digest_size * 2
        int(digest, 16)
