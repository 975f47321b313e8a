"""The account preflight: what the client, `removebg check`, `removebg run` and the hook learn before billing.

The local server under uvicorn (with a number of credits) answers the account endpoints for real;
a replay server scripts what the local server cannot do on demand: a 402 although credits are left,
or a service that is not activated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from removebg_provider.client import ImageRecord, RemoveBgClient
from removebg_provider.errors import OutOfCreditsError, PaymentRequiredError
from removebg_provider.hooks import RemoveBgHook
from support.replay_server import ReplayServer, Reply, api_body, serve_replays
from support.servers import LocalApiServer, sample_photo, start_api_server

FAST = "/removebg/fast/removebg"
DETAILS = "/account/v2/details/"
AUTHORIZE = "/authorization/v2/authorize"
REFUSED_402 = Reply(402, api_body(code=402, text="aborted by error"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApiServer]:
    with start_api_server(tmp_path_factory.mktemp("server"), credits=3) as running:
        yield running


@pytest.fixture
def replay() -> Iterator[ReplayServer]:
    with serve_replays() as running:
        yield running


def _photos(folder: Path, count: int) -> list[ImageRecord]:
    return [ImageRecord(f"r{i}", data=sample_photo(32 + i, 32)) for i in range(count)]


def _manifest(folder: Path, rows: int) -> str:
    paths = []
    for index in range(rows):
        path = folder / f"p{index}.png"
        path.write_bytes(sample_photo(40 + index, 32))
        paths.append(str(path))
    manifest = folder / "manifest.parquet"
    pq.write_table(pa.table({"image_url": paths}), manifest)
    return str(manifest)


def _outputs(folder: Path) -> list[str]:
    return ["--output-prefix", str(folder / "out"), "--output-manifest", str(folder / "out.parquet")]


def _removebg(
    server: LocalApiServer, *args: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "removebg_provider", *args, "--endpoint", server.base_url],
        capture_output=True,
        text=True,
        env={**os.environ, "REMOVEBG_API_TOKEN": token or server.token or ""},
        timeout=300,
        check=False,
    )


def test_the_account_status_says_token_accepted_service_activated_and_credits_left(
    server: LocalApiServer,
) -> None:
    with RemoveBgClient(server.base_url, server.token) as client:
        account = client.account_status()

    assert (account.token_accepted, account.service_active, account.credits_left) == (True, True, 3)


def test_the_account_status_says_when_the_token_is_refused(server: LocalApiServer) -> None:
    with RemoveBgClient(server.base_url, "not-the-token") as client:
        assert client.account_status().token_accepted is False


def test_a_402_with_too_few_credits_left_is_out_of_credits_naming_them(
    server: LocalApiServer, tmp_path: Path
) -> None:
    with (
        RemoveBgClient(server.base_url, server.token) as client,
        pytest.raises(OutOfCreditsError, match=r"5 record\(s\).*the account has 3 credit\(s\) left"),
    ):
        client.remove_batch(_photos(tmp_path, 5))


def test_a_402_although_credits_are_left_is_not_called_a_shortage_of_credits(replay: ReplayServer) -> None:
    replay.script(FAST, REFUSED_402)
    replay.script(DETAILS, Reply(200, {"credits": 1000}))
    replay.script(AUTHORIZE, Reply(200, {"user_id": 7}))

    with RemoveBgClient(replay.base_url, "tok") as client, pytest.raises(PaymentRequiredError) as raised:
        client.remove_batch([ImageRecord("a", url="https://shop.example/a.jpg")])

    assert not isinstance(raised.value, OutOfCreditsError)
    assert "reports 1000 credit(s) left, enough for it: not a shortage of credits" in str(raised.value)


def test_a_402_for_an_account_without_the_service_says_to_activate_it(replay: ReplayServer) -> None:
    replay.script(FAST, REFUSED_402)
    replay.script(DETAILS, Reply(200, {"credits": 1000}))
    replay.script(AUTHORIZE, Reply(403, {"detail": "User has no access for service"}))

    with (
        RemoveBgClient(replay.base_url, "tok") as client,
        pytest.raises(PaymentRequiredError, match="remove-bg service is not activated for the account"),
    ):
        client.remove_batch([ImageRecord("a", url="https://shop.example/a.jpg")])


def test_check_reports_the_account_and_a_manifests_billable_records_against_its_credits(
    server: LocalApiServer, tmp_path: Path
) -> None:
    done = _removebg(server, "check", _manifest(tmp_path, 2), *_outputs(tmp_path))

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["token_accepted"], report["service_active"], report["credits_left"]) == (True, True, 3)
    assert (report["billable"], report["enough_credits"]) == (2, True)


def test_check_exits_three_when_the_manifest_needs_more_credits_than_are_left(
    server: LocalApiServer, tmp_path: Path
) -> None:
    done = _removebg(server, "check", _manifest(tmp_path, 5), *_outputs(tmp_path))

    assert done.returncode == 3
    assert "5 billable records exceed the 3 credits left" in done.stderr


def test_check_exits_four_when_the_token_is_refused(server: LocalApiServer) -> None:
    done = _removebg(server, "check", token="not-the-token")

    assert done.returncode == 4
    assert "not-the-token" not in done.stdout + done.stderr


def test_run_refuses_to_start_with_more_billable_records_than_credits_left(
    server: LocalApiServer, tmp_path: Path
) -> None:
    server.reset_stats()
    manifest = _manifest(tmp_path, 5)

    done = _removebg(server, "run", manifest, *_outputs(tmp_path), "--no-progress")

    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("removebg run: error: 5 billable records exceed")
    assert server.stats()["requests"] == 0


def test_the_connection_test_reports_the_service_and_the_credits_left(
    server: LocalApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection: dict[str, Any] = {"conn_type": "removebg", "host": server.base_url, "password": server.token}
    monkeypatch.setenv("AIRFLOW_CONN_REMOVEBG_DEFAULT", json.dumps(connection))

    ok, message = RemoveBgHook().test_connection()

    assert ok, message
    assert "the Remove Background service is activated; 3 credits left" in message
