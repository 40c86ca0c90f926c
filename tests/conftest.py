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
from hypothesis import settings
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import mailoutbox
from mailoutbox import Outbox
from mailoutbox.aio import AsyncOutbox

from .async_bridge import LoopThread, SyncOutbox
from .postgres import postgres_server

SCHEMA = "mailoutbox"
_counter = itertools.count()

# Property tests draw the same examples on every run, so a red run is the code's
# doing and reproducible. MAILOUTBOX_TEST_EXPLORE=1 draws new ones each run: that
# is how the examples pinned with @example were found.
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("explore" if os.environ.get("MAILOUTBOX_TEST_EXPLORE") else "reproducible")


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


DEFAULT_SENDER = "Shop <noreply@example.com>"


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    """An event loop in a background thread, for the async variants."""
    loop = LoopThread()
    yield loop
    loop.close()


@pytest.fixture
def sync_outbox(engine: sa.Engine) -> Outbox:
    """The synchronous Outbox (for tests of what only it offers, e.g. a sync Connection)."""
    return Outbox(engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)


@pytest.fixture(params=["sync", "async"])
def outbox(
    request: pytest.FixtureRequest, engine: sa.Engine, db_url: sa.URL, loop_thread: LoopThread
) -> Iterator[Outbox]:
    """The Outbox, and (second run) AsyncOutbox behind the same API: one suite for both."""
    if request.param == "sync":
        yield Outbox(engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
        return
    async_engine = loop_thread.run(_create_async_engine(db_url))
    aoutbox = AsyncOutbox(async_engine, schema=SCHEMA, default_sender=DEFAULT_SENDER)
    yield SyncOutbox(aoutbox, loop_thread, engine)  # type: ignore[misc]
    loop_thread.run(async_engine.dispose())


async def _create_async_engine(url: sa.URL) -> AsyncEngine:
    return create_async_engine(url, pool_size=20, max_overflow=20)
