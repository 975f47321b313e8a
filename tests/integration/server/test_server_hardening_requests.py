"""Requests the server cannot answer are refused before billing, and its billing counters need the token."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from support.servers import LocalApiServer, sample_photo_base64, start_api_server

FAST = "/removebg/fast/removebg"
PHOTO = sample_photo_base64()


def post_raw(server: LocalApiServer, body: str) -> requests.Response:
    headers = {**server.auth_headers(), "Content-Type": "application/json"}
    return requests.post(f"{server.base_url}{FAST}", data=body.encode(), headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("record", "named"),
    [
        (f'{{"_id": NaN, "_base64": "{PHOTO}"}}', "records[1]._id is NaN"),
        (f'{{"_id": Infinity, "_base64": "{PHOTO}"}}', "records[1]._id is Infinity"),
        (f'{{"_id": "a", "price": -Infinity, "_base64": "{PHOTO}"}}', "records[1].price is -Infinity"),
        (
            f'{{"_id": "a", "sku": {{"weight": 1e400}}, "_base64": "{PHOTO}"}}',
            "records[1].sku.weight is 1e400",
        ),
        (f'{{"_id": "a", "tags": [1, NaN], "_base64": "{PHOTO}"}}', "records[1].tags[1] is NaN"),
        (f'{{"_id": "\\ud800", "_base64": "{PHOTO}"}}', "records[1]._id holds an unpaired surrogate"),
    ],
)
def test_a_value_json_cannot_carry_is_refused_with_400_before_anything_is_billed(
    api_server: LocalApiServer, record: str, named: str
) -> None:
    response = post_raw(api_server, f'{{"records": [{{"_id": "fine", "_base64": "{PHOTO}"}}, {record}]}}')

    assert response.status_code == 400
    assert named in response.json()["status"]["error_description"]
    stats = api_server.stats()
    assert stats["records_billed"] == 0
    assert stats["requests_rejected"] == 1


def test_finite_numbers_and_ordinary_text_are_echoed_back(api_server: LocalApiServer) -> None:
    body = f'{{"records": [{{"_id": 7, "price": 1.5e300, "name": "caf\\u00e9", "_base64": "{PHOTO}"}}]}}'

    record = post_raw(api_server, body).json()["records"][0]

    assert record["_status"]["code"] == 200
    assert (record["_id"], record["price"], record["name"]) == (7, 1.5e300, "café")


def test_stats_need_the_token_when_the_server_has_one(api_server: LocalApiServer) -> None:
    without = requests.get(f"{api_server.base_url}/stats", timeout=10)
    wrong = requests.get(f"{api_server.base_url}/stats", headers={"Authorization": "Token nope"}, timeout=10)
    right = requests.get(f"{api_server.base_url}/stats", headers=api_server.auth_headers(), timeout=10)

    assert without.status_code == 401
    assert "records_billed" not in without.text
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert right.json()["records_billed"] == 0


def test_stats_are_open_on_a_server_without_a_token(tmp_path: Path) -> None:
    with start_api_server(tmp_path, token=None) as server:
        response = requests.get(f"{server.base_url}/stats", timeout=10)

    assert response.status_code == 200
