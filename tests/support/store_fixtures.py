"""Pytest fixtures for real object stores: moto S3, fake-gcs-server and Azurite, one of each per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support.stores import (
    AzuriteBlob,
    FakeGcs,
    MotoS3,
    ObjectStore,
    StoreServer,
    fresh_store,
    start_azurite,
    start_fake_gcs,
    start_moto_s3,
)

STORE_SCHEMES = ("s3", "gs", "az")


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto's S3 server on a free 127.0.0.1 port."""
    with start_moto_s3() as server:
        yield server


@pytest.fixture(scope="session")
def fake_gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    """fake-gcs-server on a free 127.0.0.1 port."""
    with start_fake_gcs(tmp_path_factory.mktemp("fake-gcs")) as server:
        yield server


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzuriteBlob]:
    """Azurite's blob service on a free 127.0.0.1 port."""
    with start_azurite(tmp_path_factory.mktemp("azurite")) as server:
        yield server


_SERVER_FIXTURES = {"s3": "moto_s3", "gs": "fake_gcs", "az": "azurite"}


@pytest.fixture(params=STORE_SCHEMES)
def store_server(request: pytest.FixtureRequest) -> StoreServer:
    """Each store's server in turn: the test runs once for s3, gs and az."""
    server: StoreServer = request.getfixturevalue(_SERVER_FIXTURES[request.param])
    return server


@pytest.fixture
def object_store(store_server: StoreServer) -> Iterator[ObjectStore]:
    """A fresh, empty bucket (container) on each store in turn, deleted after the test."""
    yield from fresh_store(store_server)
