"""Migrations: idempotent upgrade, full downgrade, own history, metadata in sync."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import mailoutbox
from mailoutbox import InvalidMail, Outbox
from mailoutbox.schema import VERSION_TABLE, tables_for

from .factories import make_mail

ROOT = Path(__file__).resolve().parent.parent
OUR_TABLES = {
    "mail_deliveries",
    "mail_payloads",
    "mail_recipients",
    "mail_attempts",
    "mail_dead_letters",
}


@pytest.fixture
def empty_engine(empty_db_url: sa.URL):  # type: ignore[no-untyped-def]
    engine = sa.create_engine(empty_db_url, poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


def tables_in(engine: sa.Engine, schema: str) -> set[str]:
    return set(sa.inspect(engine).get_table_names(schema=schema))


def test_migrate_creates_tables_in_chosen_schema_and_is_idempotent(empty_engine: sa.Engine) -> None:
    """migrate() twice in a custom schema gives the tables once, with our version table."""
    mailoutbox.migrate(empty_engine, schema="mail_app")
    mailoutbox.migrate(empty_engine, schema="mail_app")
    assert tables_in(empty_engine, "mail_app") == OUR_TABLES | {VERSION_TABLE}
    outbox = Outbox(empty_engine, schema="mail_app", default_sender="a@example.com")
    assert outbox.enqueue(make_mail()).created


def test_the_deliveries_table_leaves_room_for_its_updates(empty_engine: sa.Engine) -> None:
    """fillfactor 80 on mail_deliveries (claimed rows are rewritten several times), set by
    a statement of its own: SQLAlchemy 2.0, which pyproject allows, has no table option
    for it and refused the whole table."""
    mailoutbox.migrate(empty_engine)
    with empty_engine.connect() as conn:
        options = conn.execute(
            sa.text(
                "SELECT reloptions FROM pg_class WHERE oid = 'mailoutbox.mail_deliveries'::regclass"
            )
        ).scalar_one()
    assert options == ["fillfactor=80"]


def test_downgrade_to_base_removes_everything_and_upgrade_works_again(
    empty_engine: sa.Engine,
) -> None:
    """upgrade -> downgrade base -> upgrade leaves a working outbox; base leaves none of ours."""
    mailoutbox.migrate(empty_engine)
    mailoutbox.downgrade(empty_engine)
    assert tables_in(empty_engine, "mailoutbox") & OUR_TABLES == set()
    with empty_engine.connect() as conn:
        functions = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = 'mailoutbox'"
            )
        ).scalar_one()
    assert functions == 0
    mailoutbox.migrate(empty_engine)
    assert tables_in(empty_engine, "mailoutbox") >= OUR_TABLES


def test_host_alembic_history_is_untouched(empty_engine: sa.Engine) -> None:
    """A host app's alembic_version table keeps its row; ours lives apart."""
    with empty_engine.begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)")
        )
        conn.execute(sa.text("INSERT INTO public.alembic_version VALUES ('host_rev_9')"))
    mailoutbox.migrate(empty_engine)
    mailoutbox.downgrade(empty_engine)
    mailoutbox.migrate(empty_engine)
    with empty_engine.connect() as conn:
        assert conn.execute(
            sa.text("SELECT version_num FROM public.alembic_version")
        ).scalars().all() == ["host_rev_9"]
        ours = (
            conn.execute(sa.text(f"SELECT version_num FROM mailoutbox.{VERSION_TABLE}"))
            .scalars()
            .all()
        )
    assert ours == ["0005"]


HOST_ENV = """
import sqlalchemy as sa
from alembic import context

import mailoutbox

engine = sa.create_engine(context.config.get_main_option("sqlalchemy.url"))
with engine.begin() as connection:
    mailoutbox.migrate(connection, schema="outbox_from_env")
    context.configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
"""

HOST_REVISION = """
import sqlalchemy as sa
from alembic import op

import mailoutbox

revision = "h001"
down_revision = None


def upgrade():
    mailoutbox.migrate(op.get_bind(), schema="outbox_from_step")
    op.create_table("host_orders", sa.Column("id", sa.Integer, primary_key=True))
"""


def test_migrate_inside_a_hosts_own_alembic_run_leaves_that_run_working(
    empty_db_url: sa.URL, empty_engine: sa.Engine, tmp_path: Path
) -> None:
    """The README offers migrate() from a host's env.py or migration step. Alembic keeps
    the running environment in module globals, and ours used to clear the host's: its
    `context.configure` and `op.create_table` met None, and its whole upgrade failed."""
    from alembic.config import Config

    from alembic import command

    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(HOST_ENV)
    (tmp_path / "versions" / "h001_orders.py").write_text(HOST_REVISION)
    config = Config()
    config.set_main_option("script_location", str(tmp_path))
    # ConfigParser interpolates %: the embedded server's socket path is URL-encoded.
    url = empty_db_url.render_as_string(hide_password=False).replace("%", "%%")
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")
    assert "host_orders" in tables_in(empty_engine, "public")
    assert tables_in(empty_engine, "outbox_from_env") >= OUR_TABLES
    assert tables_in(empty_engine, "outbox_from_step") >= OUR_TABLES
    with empty_engine.connect() as conn:
        host = conn.execute(sa.text("SELECT version_num FROM public.alembic_version")).scalars()
        assert host.all() == ["h001"]


def test_a_role_that_owns_its_schema_migrates_without_create_on_the_database(
    empty_db_url: sa.URL, empty_engine: sa.Engine
) -> None:
    """Least privilege: a DBA makes the schema for the application's role, which may not
    create schemas. migrate() used to need that privilege even with the schema at head."""
    role = f"mailoutbox_app_{os.getpid()}"
    with empty_engine.begin() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(sa.text(f'CREATE SCHEMA app_mail AUTHORIZATION "{role}"'))
    app = sa.create_engine(empty_db_url.set(username=role), poolclass=sa.pool.NullPool)
    try:
        with app.connect() as conn:
            may_create = conn.execute(
                sa.text("SELECT has_database_privilege(current_database(), 'CREATE')")
            ).scalar_one()
        assert may_create is False
        mailoutbox.migrate(app, schema="app_mail")
        mailoutbox.migrate(app, schema="app_mail")
        assert tables_in(app, "app_mail") == OUR_TABLES | {VERSION_TABLE}
        assert Outbox(app, schema="app_mail", default_sender="a@example.com").enqueue(make_mail())
    finally:
        app.dispose()
        with empty_engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA app_mail CASCADE"))
            conn.execute(sa.text(f'DROP ROLE "{role}"'))


def test_migrate_on_callers_connection_joins_its_transaction(empty_engine: sa.Engine) -> None:
    """With a Connection, migrate runs in the caller's transaction and rolls back with it."""
    with empty_engine.connect() as conn:
        trans = conn.begin()
        mailoutbox.migrate(conn)
        trans.rollback()
    assert tables_in(empty_engine, "mailoutbox") == set()


def test_concurrent_migrations_do_not_collide(empty_db_url: sa.URL) -> None:
    """Four worker processes starting at once all migrate without error."""
    url = empty_db_url.render_as_string(hide_password=False)
    code = (
        "import sys, sqlalchemy as sa, mailoutbox; "
        "e = sa.create_engine(sys.argv[1], poolclass=sa.pool.NullPool); "
        "mailoutbox.migrate(e); e.dispose()"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    for p in procs:
        if p.stderr:
            p.stderr.close()
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    engine = sa.create_engine(empty_db_url, poolclass=sa.pool.NullPool)
    try:
        assert tables_in(engine, "mailoutbox") >= OUR_TABLES
    finally:
        engine.dispose()


def test_metadata_matches_the_migration(empty_engine: sa.Engine) -> None:
    """alembic's autogenerate finds no difference between schema.py and the migrated database."""
    mailoutbox.migrate(empty_engine, schema="cmp")
    metadata = tables_for("cmp").metadata
    with empty_engine.connect() as conn:
        context = MigrationContext.configure(
            conn,
            opts={
                "include_schemas": True,
                "include_name": lambda name, type_, parents: (
                    name == "cmp" if type_ == "schema" else name != VERSION_TABLE
                ),
                "compare_type": True,
                "compare_server_default": True,
            },
        )
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_invalid_schema_name_is_rejected() -> None:
    """Schema names are plain identifiers; anything else is refused before any SQL."""
    for bad in ("Mail", "1abc", "a-b", 'x"; drop table y; --', "", "a" * 64):
        with pytest.raises(InvalidMail):
            tables_for(bad)


def test_alembic_command_line_from_repository_root(empty_db_url: sa.URL) -> None:
    """`alembic upgrade head` / `downgrade base` work from a checkout with DATABASE_URL."""
    env = {
        **os.environ,
        "DATABASE_URL": empty_db_url.render_as_string(hide_password=False),
        "MAILOUTBOX_SCHEMA": "cli_schema",
    }
    alembic = [sys.executable, "-m", "alembic"]
    for args in (["upgrade", "head"], ["upgrade", "head"], ["current"]):
        run = subprocess.run(alembic + args, cwd=ROOT, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    assert "0005 (head)" in run.stdout
    engine = sa.create_engine(empty_db_url, poolclass=sa.pool.NullPool)
    try:
        assert tables_in(engine, "cli_schema") >= OUR_TABLES
        run = subprocess.run(
            [*alembic, "downgrade", "base"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert run.returncode == 0, run.stderr
        assert tables_in(engine, "cli_schema") & OUR_TABLES == set()
    finally:
        engine.dispose()


def test_upgrade_sql_prints_ddl_for_a_dba() -> None:
    """upgrade_sql renders the DDL offline, in the chosen schema, without a database."""
    from mailoutbox.migrations import upgrade_sql

    ddl = upgrade_sql("dba_schema")
    assert "CREATE TABLE dba_schema.mail_deliveries" in ddl
    assert "FOR UPDATE" not in ddl
    assert "mailoutbox_alembic_version" in ddl
