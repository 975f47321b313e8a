"""The local server answers the documented Ximilar Remove Background request and response, over real HTTP."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image

from support.servers import LocalApiServer, sample_photo, sample_photo_base64, start_api_server

FAST = "/removebg/fast/removebg"
PRECISE = "/removebg/precise/removebg"


def post(server: LocalApiServer, path: str, body: Any, **kwargs: Any) -> requests.Response:
    return requests.post(
        f"{server.base_url}{path}", json=body, headers=server.auth_headers(), timeout=30, **kwargs
    )


def download(url: str) -> Image.Image:
    response = requests.get(url, timeout=30)
    response.raise_for_status()
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_precise_response_has_every_documented_field(api_server: LocalApiServer) -> None:
    body = {"records": [{"_base64": sample_photo_base64(), "binary_mask": True, "white_background": True}]}

    answer = post(api_server, PRECISE, body).json()

    record = answer["records"][0]
    assert record["_status"]["code"] == 200
    assert record["_status"]["text"] == "OK"
    assert record["_status"]["request_id"] == answer["status"]["request_id"]
    uuid.UUID(record["_id"])
    assert (record["_width"], record["_height"]) == (96, 64)
    assert record["_output_url"].endswith(".png")
    assert record["_output_url_mask"].endswith(".jpg")
    assert record["_output_url_whitebg"].endswith(".jpg")
    assert answer["status"]["code"] == 200
    assert answer["status"]["text"] == "OK"
    uuid.UUID(answer["status"]["proc_id"])
    assert isinstance(answer["statistics"]["processing time"], float)


def test_fast_endpoint_returns_a_transparent_png_cutout(api_server: LocalApiServer) -> None:
    record = post(api_server, FAST, {"records": [{"_base64": sample_photo_base64()}]}).json()["records"][0]

    cutout = download(record["_output_url"])

    assert cutout.format == "PNG"
    assert cutout.mode == "RGBA"
    assert cutout.size == (96, 64)
    alpha = np.asarray(cutout)[:, :, 3]
    assert alpha[32, 48] == 255
    assert alpha[2, 2] == 0


def test_mask_and_white_background_are_omitted_unless_asked_for(api_server: LocalApiServer) -> None:
    record = post(api_server, FAST, {"records": [{"_base64": sample_photo_base64()}]}).json()["records"][0]

    assert "_output_url_mask" not in record
    assert "_output_url_whitebg" not in record


def test_binary_mask_is_a_black_and_white_jpeg(api_server: LocalApiServer) -> None:
    body = {"records": [{"_base64": sample_photo_base64(), "binary_mask": True}]}
    record = post(api_server, FAST, body).json()["records"][0]

    mask = download(record["_output_url_mask"])

    assert mask.format == "JPEG"
    pixels = np.asarray(mask.convert("L"))
    assert pixels[32, 48] > 200
    assert pixels[2, 2] < 50


def test_white_background_output_is_white_where_the_backdrop_was(api_server: LocalApiServer) -> None:
    body = {"records": [{"_base64": sample_photo_base64(), "white_background": True}]}
    record = post(api_server, FAST, body).json()["records"][0]

    whitebg = np.asarray(download(record["_output_url_whitebg"]).convert("RGB")).astype(int)

    assert whitebg[2, 2].min() > 245
    assert abs(whitebg[32, 48] - np.array([40, 70, 160])).max() < 20


@pytest.mark.parametrize(("image_format", "pil_format"), [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_image_format_chooses_the_cutout_format(
    api_server: LocalApiServer, image_format: str, pil_format: str
) -> None:
    body = {"records": [{"_base64": sample_photo_base64(), "image_format": image_format}]}
    record = post(api_server, FAST, body).json()["records"][0]

    cutout = download(record["_output_url"])

    assert record["_output_url"].endswith(f".{image_format}")
    assert cutout.format == pil_format


def test_jpg_cutout_is_flattened_on_white(api_server: LocalApiServer) -> None:
    body = {"records": [{"_base64": sample_photo_base64(), "image_format": "jpg"}]}
    record = post(api_server, FAST, body).json()["records"][0]

    cutout = download(record["_output_url"])

    assert cutout.mode == "RGB"
    assert np.asarray(cutout)[2, 2].min() > 245


def test_request_level_image_format_applies_to_every_record(api_server: LocalApiServer) -> None:
    body = {"records": [{"_base64": sample_photo_base64()}], "image_format": "webp"}

    record = post(api_server, FAST, body).json()["records"][0]

    assert record["_output_url"].endswith(".webp")


def test_record_image_format_overrides_the_request_level_one(api_server: LocalApiServer) -> None:
    body = {"records": [{"_base64": sample_photo_base64(), "image_format": "jpg"}], "image_format": "webp"}

    record = post(api_server, FAST, body).json()["records"][0]

    assert record["_output_url"].endswith(".jpg")


def test_image_quality_changes_the_jpeg_size(api_server: LocalApiServer) -> None:
    def cutout_size(quality: int) -> int:
        photo = sample_photo_base64(320, 240)
        body = {"records": [{"_base64": photo, "image_format": "jpg", "image_quality": quality}]}
        record = post(api_server, FAST, body).json()["records"][0]
        return len(requests.get(record["_output_url"], timeout=30).content)

    assert cutout_size(5) < cutout_size(100)


def test_client_id_and_extra_fields_are_echoed_without_the_base64(api_server: LocalApiServer) -> None:
    body = {
        "records": [{"_base64": sample_photo_base64(), "_id": "sku-42", "sku": "A-1", "meta": {"row": 7}}]
    }

    record = post(api_server, FAST, body).json()["records"][0]

    assert record["_id"] == "sku-42"
    assert record["sku"] == "A-1"
    assert record["meta"] == {"row": 7}
    assert "_base64" not in record


def test_records_come_back_in_request_order_with_distinct_ids(api_server: LocalApiServer) -> None:
    body = {"records": [{"_base64": sample_photo_base64(), "n": n} for n in range(4)]}

    records = post(api_server, FAST, body).json()["records"]

    assert [record["n"] for record in records] == [0, 1, 2, 3]
    assert len({record["_id"] for record in records}) == 4


def test_data_uri_base64_is_accepted(api_server: LocalApiServer) -> None:
    data_uri = "data:image/jpeg;base64," + base64.b64encode(sample_photo(image_format="JPEG")).decode()

    record = post(api_server, FAST, {"records": [{"_base64": data_uri}]}).json()["records"][0]

    assert record["_status"]["code"] == 200


def test_output_urls_use_the_public_url_when_configured(tmp_path: Path) -> None:
    with start_api_server(tmp_path, public_url="https://cdn.example.com/rmbg/") as server:
        record = post(server, FAST, {"records": [{"_base64": sample_photo_base64()}]}).json()["records"][0]

    assert record["_output_url"].startswith("https://cdn.example.com/rmbg/files/")


def test_a_bad_record_fails_alone_while_the_others_succeed(api_server: LocalApiServer) -> None:
    body = {
        "records": [
            {"_base64": sample_photo_base64(), "_id": "good"},
            {"_base64": "%%% not base64 %%%", "_id": "bad-base64"},
            {"_base64": base64.b64encode(b"plain text, not an image").decode(), "_id": "not-an-image"},
            {"_id": "no-image"},
        ]
    }

    response = post(api_server, FAST, body)

    assert response.status_code == 200
    statuses = {record["_id"]: record["_status"] for record in response.json()["records"]}
    assert statuses["good"]["code"] == 200
    assert statuses["bad-base64"]["code"] == 400
    assert "base64" in statuses["bad-base64"]["text"]
    assert statuses["not-an-image"]["code"] == 415
    assert "not an image" in statuses["not-an-image"]["text"]
    assert statuses["no-image"]["code"] == 400
    assert "_url" in statuses["no-image"]["text"]


def test_an_image_over_the_byte_limit_fails_alone(tmp_path: Path) -> None:
    with start_api_server(tmp_path, max_image_bytes=2000) as server:
        body = {
            "records": [{"_base64": sample_photo_base64(400, 300, "BMP")}, {"_base64": sample_photo_base64()}]
        }
        records = post(server, FAST, body).json()["records"]

    assert records[0]["_status"]["code"] == 413
    assert records[1]["_status"]["code"] == 200


def test_an_image_over_the_pixel_limit_fails_alone(tmp_path: Path) -> None:
    with start_api_server(tmp_path, max_image_pixels=10_000) as server:
        body = {
            "records": [{"_base64": sample_photo_base64(200, 100)}, {"_base64": sample_photo_base64(96, 64)}]
        }
        records = post(server, FAST, body).json()["records"]

    assert records[0]["_status"]["code"] == 413
    assert "200x100" in records[0]["_status"]["text"]
    assert records[1]["_status"]["code"] == 200


def test_an_engine_crash_fails_only_that_record(tmp_path: Path) -> None:
    class CrashesOnTallImages:
        name = "crashy"

        def matte(self, rgb: np.ndarray, mode: str) -> np.ndarray:
            if rgb.shape[0] > rgb.shape[1]:
                raise RuntimeError("boom")
            return np.full(rgb.shape[:2], 255, np.uint8)

    with start_api_server(tmp_path, engine=CrashesOnTallImages()) as server:
        body = {
            "records": [{"_base64": sample_photo_base64(30, 60)}, {"_base64": sample_photo_base64(60, 30)}]
        }
        records = post(server, FAST, body).json()["records"]

    assert records[0]["_status"]["code"] == 500
    assert records[1]["_status"]["code"] == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Token wrong-token"}, {"Authorization": "Bearer test-token"}],
    ids=["missing", "wrong", "wrong-scheme"],
)
def test_requests_without_the_right_token_get_401(
    api_server: LocalApiServer, headers: dict[str, str]
) -> None:
    body = {"records": [{"_base64": sample_photo_base64()}]}

    response = requests.post(f"{api_server.base_url}{FAST}", json=body, headers=headers, timeout=30)

    assert response.status_code == 401
    assert response.json()["status"]["code"] == 401
    assert "Authorization: Token" in response.json()["status"]["error_description"]
    assert api_server.stats()["records_billed"] == 0


def test_the_token_never_appears_in_error_bodies(api_server: LocalApiServer) -> None:
    response = requests.post(
        f"{api_server.base_url}{FAST}", data=b"{", headers=api_server.auth_headers(), timeout=30
    )

    assert api_server.token is not None
    assert api_server.token not in response.text


def test_auth_is_off_when_the_server_has_no_token(tmp_path: Path) -> None:
    with start_api_server(tmp_path, token=None) as server:
        body = {"records": [{"_base64": sample_photo_base64()}]}
        response = requests.post(f"{server.base_url}{FAST}", json=body, timeout=30)

    assert response.status_code == 200


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b"{}", "non-empty list"),
        (b'{"records": []}', "non-empty list"),
        (b'{"records": ["x"]}', "records[0] must be a JSON object"),
        (b'{"records": [{"_url": "http://x"}], "colour": "red"}', "unknown request field(s) colour"),
        (b'{"records": [{"_url": "http://x"}], "image_format": "gif"}', "image_format"),
        (b'{"records": [{"_url": "http://x", "image_quality": 0}]}', "image_quality"),
        (b'{"records": [{"_url": "http://x", "image_quality": "85"}]}', "image_quality"),
        (b'{"records": [{"_url": "http://x", "binary_mask": "yes"}]}', "binary_mask"),
        (b'{"records": [{"_url": "http://x", "white_background": 1}]}', "white_background"),
    ],
    ids=[
        "malformed-json",
        "not-an-object",
        "no-records",
        "empty-records",
        "record-not-an-object",
        "unknown-field",
        "bad-format",
        "quality-zero",
        "quality-string",
        "mask-not-bool",
        "whitebg-not-bool",
    ],
)
def test_malformed_requests_get_400_with_a_description(
    api_server: LocalApiServer, body: bytes, complaint: str
) -> None:
    response = requests.post(
        f"{api_server.base_url}{FAST}",
        data=body,
        headers={**api_server.auth_headers(), "Content-Type": "application/json"},
        timeout=30,
    )

    assert response.status_code == 400
    status = response.json()["status"]
    assert status["code"] == 400
    assert status["text"] == "Bad Request"
    assert complaint in status["error_description"]
    assert api_server.stats()["records_billed"] == 0


def test_more_records_than_max_records_get_400(tmp_path: Path) -> None:
    with start_api_server(tmp_path, max_records=2) as server:
        body = {"records": [{"_base64": sample_photo_base64()}] * 3}
        response = post(server, FAST, body)

    assert response.status_code == 400
    assert "at most 2" in response.json()["status"]["error_description"]


def test_a_body_over_the_limit_gets_413(tmp_path: Path) -> None:
    with start_api_server(tmp_path, max_body_bytes=1000) as server:
        response = post(server, FAST, {"records": [{"_base64": "A" * 2000}]})

    assert response.status_code == 413
    assert response.json()["status"]["code"] == 413


def test_a_chunked_body_over_the_limit_gets_413(tmp_path: Path) -> None:
    def chunks() -> Any:
        yield b'{"records": [{"_base64": "'
        for _ in range(10):
            yield b"A" * 200
        yield b'"}]}'

    with start_api_server(tmp_path, max_body_bytes=1000) as server:
        response = requests.post(
            f"{server.base_url}{FAST}", data=chunks(), headers=server.auth_headers(), timeout=30
        )

    assert response.status_code == 413


def test_unknown_mode_gets_404_in_the_error_shape(api_server: LocalApiServer) -> None:
    response = post(api_server, "/removebg/turbo/removebg", {"records": [{"_url": "http://x"}]})

    assert response.status_code == 404
    assert response.json()["status"]["code"] == 404


def test_health_answers_without_a_token(api_server: LocalApiServer) -> None:
    response = requests.get(f"{api_server.base_url}/health", timeout=10)

    assert response.status_code == 200
    assert response.json()["status"]["code"] == 200
    assert response.json()["engine"] == "classic"


def test_health_rejects_a_wrong_token_so_clients_can_test_their_connection(
    api_server: LocalApiServer,
) -> None:
    wrong = requests.get(f"{api_server.base_url}/health", headers={"Authorization": "Token nope"}, timeout=10)
    right = requests.get(f"{api_server.base_url}/health", headers=api_server.auth_headers(), timeout=10)

    assert wrong.status_code == 401
    assert right.status_code == 200


def test_stats_count_requests_and_billed_ok_and_failed_records(api_server: LocalApiServer) -> None:
    body = {
        "records": [{"_base64": sample_photo_base64()}, {"_base64": "!!"}, {"_base64": sample_photo_base64()}]
    }
    post(api_server, FAST, body)
    post(api_server, FAST, {"records": []})

    assert api_server.stats() == {
        "requests": 2,
        "requests_rejected": 1,
        "records_billed": 2,
        "records_ok": 2,
        "records_failed": 1,
    }


def test_health_checks_are_never_billed(api_server: LocalApiServer) -> None:
    requests.get(f"{api_server.base_url}/health", headers=api_server.auth_headers(), timeout=10)

    assert api_server.stats()["requests"] == 0
    assert api_server.stats()["records_billed"] == 0


def test_stats_reset_needs_the_token(api_server: LocalApiServer) -> None:
    post(api_server, FAST, {"records": [{"_base64": sample_photo_base64()}]})

    refused = requests.post(f"{api_server.base_url}/stats/reset", timeout=10)
    billed_after_refusal = api_server.stats()["records_billed"]
    api_server.reset_stats()

    assert refused.status_code == 401
    assert billed_after_refusal == 1
    assert api_server.stats()["records_billed"] == 0
