"""Shared pytest fixtures: a real local API server per test."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.servers import LocalApiServer, start_api_server

pytest_plugins = ["support.store_fixtures"]

# Importing Airflow creates folders under AIRFLOW_HOME (default ~/airflow); tests keep theirs private.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="removebg-tests-airflow-"))


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[LocalApiServer]:
    """A local Ximilar-compatible server with default settings, the classic engine and token "test-token"."""
    with start_api_server(tmp_path) as server:
        yield server
