"""Claims of the result store: a run that holds one longer than its lease keeps it."""

from __future__ import annotations

import json
import socket
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from removebg_provider.pipeline.store import ResultStore
from removebg_provider.storage import Storage

_KEY = "ab" + "0" * 38
_LEASE = timedelta(seconds=3)
# Generous: renewals run on a thread of a possibly very busy machine.
_DEADLINE_SECONDS = 120
_RECENT = datetime.now(timezone.utc).isoformat()
# JSON objects that are not claims a run writes: none of them can be judged alive.
_MALFORMED_CLAIMS = {
    "no time": {"holder": "elsewhere"},
    "a time without a zone": {"holder": "elsewhere", "claimed_at": "2020-01-01T00:00:00"},
    "not a time": {"holder": "elsewhere", "claimed_at": "yesterday"},
    "a number for a time": {"holder": "elsewhere", "claimed_at": 5},
    "a lease out of range": {"holder": "elsewhere", "claimed_at": _RECENT, "lease_seconds": 1e300},
    "a lease that is not a number": {
        "holder": "elsewhere",
        "claimed_at": _RECENT,
        "lease_seconds": float("nan"),
    },
    "a pid out of range": {
        "holder": "elsewhere",
        "claimed_at": _RECENT,
        "host": socket.gethostname(),
        "pid": 2**70,
    },
}


def _claimed_at(store: ResultStore) -> datetime:
    return datetime.fromisoformat(json.loads(Path(store.claim_uri(_KEY)).read_text())["claimed_at"])


def test_a_claim_held_past_its_lease_is_renewed_and_not_taken_over(tmp_path: Path) -> None:
    holder = ResultStore(str(tmp_path / "store"), Storage(), "run-a/shard-0", lease=_LEASE)
    assert holder.claim(_KEY)
    first = _claimed_at(holder)
    deadline = time.monotonic() + _DEADLINE_SECONDS
    # Wait until a renewal came after the first lease would have run out.
    while _claimed_at(holder) - first <= _LEASE and time.monotonic() < deadline:
        time.sleep(0.1)

    other = ResultStore(str(tmp_path / "store"), Storage(), "run-b/shard-0")

    assert _claimed_at(holder) - first > _LEASE
    assert not other.claim(_KEY)
    holder.release(_KEY)


def test_a_released_claim_can_be_taken_by_another_run(tmp_path: Path) -> None:
    holder = ResultStore(str(tmp_path / "store"), Storage(), "run-a/shard-0", lease=_LEASE)
    assert holder.claim(_KEY)

    holder.release(_KEY)

    assert ResultStore(str(tmp_path / "store"), Storage(), "run-b/shard-0").claim(_KEY)


def test_a_claim_records_its_lease_for_the_runs_that_meet_it(tmp_path: Path) -> None:
    holder = ResultStore(str(tmp_path / "store"), Storage(), "run-a/shard-0", lease=_LEASE)

    assert holder.claim(_KEY)

    assert json.loads(Path(holder.claim_uri(_KEY)).read_text())["lease_seconds"] == 3
    holder.release(_KEY)


@pytest.mark.parametrize("claim", _MALFORMED_CLAIMS.values(), ids=_MALFORMED_CLAIMS.keys())
def test_a_claim_that_cannot_be_judged_is_taken_over_as_abandoned(
    tmp_path: Path, claim: dict[str, Any]
) -> None:
    store = ResultStore(str(tmp_path / "store"), Storage(), "run-a/shard-0")
    store.storage.write_bytes(store.claim_uri(_KEY), json.dumps(claim).encode())

    assert store.claim(_KEY)
    store.release(_KEY)


@pytest.mark.parametrize("claim", _MALFORMED_CLAIMS.values(), ids=_MALFORMED_CLAIMS.keys())
def test_a_claim_that_cannot_be_judged_is_pruned(tmp_path: Path, claim: dict[str, Any]) -> None:
    store = ResultStore(str(tmp_path / "store"), Storage(), "run-a/shard-0")
    store.storage.write_bytes(store.claim_uri(_KEY), json.dumps(claim).encode())

    assert store.prune(timedelta(days=1)).claims_removed == 1
