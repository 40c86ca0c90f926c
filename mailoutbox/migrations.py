"""Run mailoutbox's alembic migrations from the installed package."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError

from alembic import command

from .errors import SchemaNotMigrated
from .schema import DEFAULT_SCHEMA, VERSION_TABLE, validate_schema_name

# Alembic keeps its running environment in module globals, so two migrations in one
# process must not overlap; across processes the advisory lock in env.py serialises them.
_alembic_lock = threading.Lock()


@contextlib.contextmanager
def script_location() -> Iterator[Path]:
    """The folder holding env.py and versions/.

    In a wheel the top-level alembic/ folder is shipped as mailoutbox/alembic; in a
    checkout (editable install) it sits beside the package.
    """
    packaged = resources.files("mailoutbox").joinpath("alembic")
    if packaged.is_dir():
        with resources.as_file(packaged) as path:
            yield path
            return
    checkout = Path(__file__).resolve().parent.parent / "alembic"
    if not (checkout / "env.py").is_file():
        raise FileNotFoundError("mailoutbox's migrations are missing from this installation")
    yield checkout


def alembic_config(connection: sa.Connection, schema: str, location: Path) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["connection"] = connection
    cfg.attributes["schema"] = schema
    return cfg


def migrate(
    engine: sa.Engine | sa.Connection, schema: str = DEFAULT_SCHEMA, *, revision: str = "head"
) -> None:
    """Bring the outbox tables in `schema` up to `revision` (alembic upgrade); idempotent.

    Accepts an Engine (the migration commits on its own) or a Connection (it runs
    in the caller's transaction, which the caller commits). The history lives in
    `<schema>.mailoutbox_alembic_version`, apart from any host alembic history;
    concurrent callers are serialised by an advisory lock.
    """
    _run(engine, schema, lambda cfg: command.upgrade(cfg, revision))


def downgrade(
    engine: sa.Engine | sa.Connection, schema: str = DEFAULT_SCHEMA, *, revision: str = "base"
) -> None:
    """Undo migrations down to `revision`; "base" drops every table the outbox created."""
    _run(engine, schema, lambda cfg: command.downgrade(cfg, revision))


def upgrade_sql(schema: str = DEFAULT_SCHEMA, *, revision: str = "head") -> str:
    """The DDL of an upgrade as SQL text, for a DBA to review and run (alembic offline mode)."""
    import io

    validate_schema_name(schema)
    buffer = io.StringIO()
    with _alembic_lock, script_location() as location:
        cfg = Config(output_buffer=buffer)
        cfg.set_main_option("script_location", str(location))
        cfg.set_main_option("sqlalchemy.url", "postgresql+psycopg://")
        cfg.attributes["schema"] = schema
        command.upgrade(cfg, revision, sql=True)
    return buffer.getvalue()


def require_current(connection: sa.Connection, schema: str = DEFAULT_SCHEMA) -> None:
    """Raise SchemaNotMigrated unless `schema` has run every migration this installation ships.

    A worker checks this before it claims anything: on a schema one migration
    behind, every claim fails on a missing column, which the loop can only retry.
    A schema *ahead* of this installation (a newer release migrated it while this
    one still runs, as in a rolling deploy) passes: migrations only add.
    """
    validate_schema_name(schema)
    context = MigrationContext.configure(
        connection, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
    )
    current = context.get_current_revision()
    with script_location() as location:
        config = Config()
        config.set_main_option("script_location", str(location))
        scripts = ScriptDirectory.from_config(config)
        head = scripts.get_current_head()
        if current == head:
            return
        if current is not None:
            try:
                scripts.get_revision(current)
            except CommandError:
                return  # a revision from a newer release
    raise SchemaNotMigrated(
        f"the outbox tables in schema {schema!r} are at migration {current or 'none'},"
        f" this mailoutbox needs {head}: run `mailoutbox migrate` or mailoutbox.migrate(engine)"
    )


@contextlib.contextmanager
def _hosts_alembic_kept() -> Iterator[None]:
    """Puts a host's running alembic environment back once ours has run.

    Alembic keeps the running migration's environment in module globals
    (`alembic.context`, `alembic.op`), and a finished run clears them. So
    migrate() called from a host's env.py, or from a host revision's upgrade(),
    left the host's own run without them ("'NoneType' object has no attribute
    'configure'"), and the host's whole migration failed.
    """
    from alembic import context, op

    running = [getattr(module, "_proxy", None) for module in (context, op)]
    try:
        yield
    finally:
        for proxy in running:
            if proxy is not None:
                proxy._install_proxy()


def _run(engine: sa.Engine | sa.Connection, schema: str, action: Callable[[Config], None]) -> None:
    validate_schema_name(schema)
    with _alembic_lock, _hosts_alembic_kept(), script_location() as location:
        if isinstance(engine, sa.Connection):
            action(alembic_config(engine, schema, location))
            return
        with engine.begin() as connection:
            action(alembic_config(connection, schema, location))
