"""The official `ximilar-client` package works against the local server unchanged.

The client skips its online token check only when the endpoint contains "localhost", so the tests
reach the server (bound to 127.0.0.1) as http://localhost:PORT/.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import requests
from PIL import Image
from ximilar.client import RemoveBGClient

from support.servers import LocalApiServer, sample_photo, sample_photo_base64


def client_for(server: LocalApiServer) -> RemoveBGClient:
    assert server.token is not None
    port = server.base_url.rsplit(":", 1)[1]
    return RemoveBGClient(token=server.token, endpoint=f"http://localhost:{port}/")


def test_official_client_removebg_fast(api_server: LocalApiServer) -> None:
    result = client_for(api_server).removebg_fast([{"_base64": sample_photo_base64(), "_id": "a"}])

    record = result["records"][0]
    assert result["status"]["code"] == 200
    assert record["_status"]["code"] == 200
    assert record["_id"] == "a"
    cutout = Image.open(io.BytesIO(requests.get(record["_output_url"], timeout=30).content))
    assert cutout.mode == "RGBA"


def test_official_client_removebg_precise_with_options(api_server: LocalApiServer) -> None:
    records = [{"_base64": sample_photo_base64(), "binary_mask": True, "white_background": True}]

    result = client_for(api_server).removebg_precise(records, image_format="webp")

    record = result["records"][0]
    assert record["_output_url"].endswith(".webp")
    assert record["_output_url_mask"].endswith(".jpg")
    assert record["_output_url_whitebg"].endswith(".jpg")


def test_official_client_sends_files_from_disk(api_server: LocalApiServer, tmp_path: Path) -> None:
    photo = tmp_path / "product.jpg"
    photo.write_bytes(sample_photo(96, 64, "JPEG"))

    result = client_for(api_server).removebg_fast([{"_file": str(photo)}])

    record = result["records"][0]
    assert record["_status"]["code"] == 200
    assert "_base64" not in record
    cutout = Image.open(io.BytesIO(requests.get(record["_output_url"], timeout=30).content))
    assert np.asarray(cutout)[32, 48, 3] == 255


def test_official_client_sees_the_documented_error_for_a_wrong_token(api_server: LocalApiServer) -> None:
    port = api_server.base_url.rsplit(":", 1)[1]
    client = RemoveBGClient(token="not-the-token", endpoint=f"http://localhost:{port}/")

    result = client.removebg_fast([{"_base64": sample_photo_base64()}])

    assert result["status"]["code"] == 401
    assert api_server.stats()["records_billed"] == 0
