"""Shared pytest fixtures: a real local API server per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import LocalApiServer, start_api_server

pytest_plugins = ["conftest_stores"]


@pytest.fixture
def api_server(tmp_path: Path) -> Iterator[LocalApiServer]:
    """A local Ximilar-compatible server with default settings, the classic engine and token "test-token"."""
    with start_api_server(tmp_path) as server:
        yield server
