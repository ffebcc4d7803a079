"""Fixtures shared by the integration tests that run the node against a PACS."""

from __future__ import annotations

import pytest
from orthanc_fixture import Pacs, free_port


@pytest.fixture(scope="session")
def pacs(tmp_path_factory) -> Pacs:
    """A pynetdicom storage SCP that records every object it receives (a duplicate shows)."""
    p = Pacs(free_port(), tmp_path_factory.mktemp("pacs"))
    p.start()
    yield p
    p.stop()


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server from Debian's packages for the whole session (skips where none is installed)."""
    from postgres_fixture import Postgres, postgres_missing

    if postgres_missing():
        pytest.skip(postgres_missing())
    server = Postgres()
    server.start()
    yield server
    server.remove()
