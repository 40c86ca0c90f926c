"""Alembic environment for mailoutbox's own migrations.

The schema comes from `config.attributes["schema"]` (set by mailoutbox.migrate),
else `-x schema=NAME`, else MAILOUTBOX_SCHEMA, else "mailoutbox". The history
lives in that schema's `mailoutbox_alembic_version` table, so a host
application's own alembic history is never read or written; `include_name`
keeps autogenerate to our tables, so it never proposes dropping the host's.
A host may pass its own Connection in `config.attributes["connection"]`.
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa

from alembic import context
from mailoutbox.schema import DEFAULT_SCHEMA, VERSION_TABLE, tables_for, validate_schema_name

config = context.config
schema = validate_schema_name(
    config.attributes.get("schema")
    or context.get_x_argument(as_dictionary=True).get("schema")
    or os.environ.get("MAILOUTBOX_SCHEMA")
    or DEFAULT_SCHEMA
)
# The migration scripts read the schema from here.
config.attributes["schema"] = schema
target_metadata = tables_for(schema).metadata
OUR_TABLES = set(target_metadata.tables)


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    if type_ == "schema":
        return name == schema
    if type_ == "table":
        return f"{schema}.{name}" in OUR_TABLES
    return True


def _configure(**kwargs: Any) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        version_table_schema=schema,
        include_schemas=True,
        include_name=include_name,
        compare_type=True,
        transaction_per_migration=False,
        **kwargs,
    )


def _database_url() -> str:
    url = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set DATABASE_URL (e.g. postgresql+psycopg://user@host/db)")
    # Accept libpq-style URLs too; we talk to PostgreSQL through psycopg 3.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def run_migrations_offline() -> None:
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        context.run_migrations()


def _run_on(connection: sa.Connection) -> None:
    # Several workers may start (and migrate) at once: serialise them per schema, until commit.
    connection.execute(
        sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
        {"key": f"mailoutbox.migrate.{schema}"},
    )
    # The version table lives in our schema, which must exist before alembic looks for it.
    # Created only when missing: PostgreSQL checks the database's CREATE privilege before
    # IF NOT EXISTS, and a role that owns its schema (made by a DBA) need not have it.
    exists = connection.execute(
        sa.text("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = :schema)"),
        {"schema": schema},
    ).scalar_one()
    if not exists:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_on(connection)
        return
    engine = sa.create_engine(_database_url(), poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        _run_on(conn)
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
