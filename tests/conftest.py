"""Shared fixtures: one migrated template database per session, a fresh copy per test.

Each test gets its own database cloned from the template (CREATE DATABASE ...
TEMPLATE), so tests can commit, run concurrent connections and leave rows
behind without seeing each other's.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import mailoutbox
from mailoutbox import Outbox

from .postgres import postgres_server

SCHEMA = "mailoutbox"
_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[sa.URL]:
    """Admin URL of the PostgreSQL server the whole session uses."""
    with postgres_server() as (url, _source):
        yield url


def _admin_execute(url: sa.URL, *statements: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def template_db(pg_admin_url: sa.URL) -> Iterator[str]:
    """Name of a database migrated to head, used as the template of every test database."""
    name = f"mailoutbox_tmpl_{os.getpid()}"
    _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
    engine = sa.create_engine(pg_admin_url.set(database=name), poolclass=sa.pool.NullPool)
    try:
        mailoutbox.migrate(engine, schema=SCHEMA)
    finally:
        engine.dispose()
    yield name
    _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_db_url(pg_admin_url: sa.URL) -> Iterator[sa.URL]:
    """URL of a fresh, empty (unmigrated) database, dropped after the test."""
    name = f"mailoutbox_t_{os.getpid()}_{next(_counter)}"
    _admin_execute(pg_admin_url, f'CREATE DATABASE "{name}"')
    yield pg_admin_url.set(database=name)
    _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(pg_admin_url: sa.URL, template_db: str) -> Iterator[sa.URL]:
    """URL of a fresh database holding migrated, empty outbox tables."""
    name = f"mailoutbox_t_{os.getpid()}_{next(_counter)}"
    _admin_execute(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield pg_admin_url.set(database=name)
    _admin_execute(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def engine(db_url: sa.URL) -> Iterator[sa.Engine]:
    engine = sa.create_engine(db_url, pool_size=20, max_overflow=20)
    yield engine
    engine.dispose()


@pytest.fixture
def outbox(engine: sa.Engine) -> Outbox:
    return Outbox(engine, schema=SCHEMA, default_sender="Shop <noreply@example.com>")
