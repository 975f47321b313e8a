"""The local server's account endpoints: credits left, the service check, and 402 past the credits.

Real HTTP against the server under uvicorn on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path

import requests

from support.servers import sample_photo_base64, start_api_server

FAST = "/removebg/fast/removebg"


def _records(count: int) -> dict[str, object]:
    return {"records": [{"_id": f"r{i}", "_base64": sample_photo_base64(32 + i, 32)} for i in range(count)]}


def test_account_details_report_the_credits_left_after_billed_records(tmp_path: Path) -> None:
    with start_api_server(tmp_path, credits=5) as server:
        requests.post(f"{server.base_url}{FAST}", json=_records(3), headers=server.auth_headers(), timeout=60)
        details = requests.get(
            f"{server.base_url}/account/v2/details/", headers=server.auth_headers(), timeout=30
        ).json()

    assert (details["credits"], details["credits_total"]) == (2, 5)


def test_account_details_report_unlimited_credits_as_null_by_default(tmp_path: Path) -> None:
    with start_api_server(tmp_path) as server:
        details = requests.get(
            f"{server.base_url}/account/v2/details/", headers=server.auth_headers(), timeout=30
        ).json()

    assert details["credits"] is None


def test_a_request_that_could_pass_the_credits_left_is_refused_402_and_bills_nothing(tmp_path: Path) -> None:
    with start_api_server(tmp_path, credits=2) as server:
        answer = requests.post(
            f"{server.base_url}{FAST}", json=_records(3), headers=server.auth_headers(), timeout=60
        )
        billed = server.stats()["records_billed"]

    assert (answer.status_code, answer.json()["status"]["code"], billed) == (402, 402, 0)
    assert "2 credit(s) left" in answer.json()["status"]["error_description"]


def test_the_authorize_endpoint_says_the_remove_background_service_is_active_for_the_token(
    tmp_path: Path,
) -> None:
    body = {"service": "remove-bg", "call_type": "authenticate"}
    with start_api_server(tmp_path) as server:
        url = f"{server.base_url}/authorization/v2/authorize"
        accepted = requests.post(url, json=body, headers=server.auth_headers(), timeout=30)
        refused = requests.post(url, json=body, headers={"Authorization": "Token wrong"}, timeout=30)
        other = requests.post(url, json={"service": "upscale"}, headers=server.auth_headers(), timeout=30)

    assert (accepted.status_code, "user_id" in accepted.json()) == (200, True)
    assert (refused.status_code, other.status_code) == (401, 403)
