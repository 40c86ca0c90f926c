"""The `mailoutbox` command line: migrate, run a worker, inspect and repair, demo.

This module wires the concrete pieces together and is the only one that reads
the environment. Tables (rich) are for people; `--json` prints a JSON document
for scripts. Errors are one line on stderr, never a traceback.

Exit codes:

    0  success
    1  the operation failed (unknown delivery id, a transition the delivery's
       state does not allow, a failed demo check, ...)
    2  usage error (unknown option, malformed duration or URL, no database configured)
    3  the database is unreachable, or its outbox schema has not been migrated

Configuration (flags win over environment variables):

    DATABASE_URL                  --database-url   postgresql://user@host:5432/db
    MAILOUTBOX_SCHEMA             --schema         PostgreSQL schema of the tables
    MAILOUTBOX_SMTP_HOST          --smtp-host
    MAILOUTBOX_SMTP_PORT          --smtp-port
    MAILOUTBOX_SMTP_SECURITY      --smtp-security  starttls | tls | none
    MAILOUTBOX_SMTP_USERNAME      --smtp-username
    MAILOUTBOX_SMTP_PASSWORD      (no flag: a flag would show in `ps`)
    MAILOUTBOX_SMTP_PASSWORD_FILE --smtp-password-file
    MAILOUTBOX_SMTP_TIMEOUT       --smtp-timeout
    MAILOUTBOX_METRICS_PORT       --metrics-port
    MAILOUTBOX_METRICS_HOST       --metrics-host   default 0.0.0.0
    MAILOUTBOX_LOG_LEVEL          --log-level
    MAILOUTBOX_LOG_FORMAT         --log-format
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import sqlalchemy as sa
from rich.console import Console
from rich.table import Table

from .errors import (
    InvalidMail,
    MailOutboxError,
    SchemaNotMigrated,
    driver_error,
    first_line,
)
from .logs import format_duration
from .outbox import MAX_OFFSET, MAX_PURGE_AGE, MAX_PURGE_BATCH, Outbox
from .records import Attempt, DeadLetter, Delivery, Recipient
from .render import envelope_address, envelope_key
from .schema import DEFAULT_SCHEMA, VERSION_TABLE, Status, validate_schema_name

# Named, not __name__: run as `python -m mailoutbox.cli` this module is __main__.
log = logging.getLogger("mailoutbox.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DATABASE = 3

PASSWORD_ENV = "MAILOUTBOX_SMTP_PASSWORD"
MAX_LIMIT = 1000
F = TypeVar("F", bound=Callable[..., Any])


# --- errors -----------------------------------------------------------------------------


class Failed(click.ClickException):
    """The operation failed (exit 1)."""

    exit_code = EXIT_FAILED


class DatabaseUnavailable(click.ClickException):
    """The database cannot be reached or is not migrated (exit 3)."""

    exit_code = EXIT_DATABASE


# admin_shutdown, crash_shutdown, cannot_connect_now
_SERVER_GOING_AWAY = ("57P01", "57P02", "57P03")


def _unreachable(exc: Exception) -> bool:
    """Whether `exc` says the database cannot be reached (exit 3), rather than that one
    statement failed on it: a statement timeout, a lock timeout or a deadlock is an
    OperationalError too, but the database answered (exit 1)."""
    if isinstance(exc, sa.exc.InterfaceError):
        return True
    if not isinstance(exc, sa.exc.OperationalError):
        return False
    sqlstate = getattr(driver_error(exc), "sqlstate", None)
    # No SQLSTATE: the connection failed before the server said anything.
    return sqlstate is None or sqlstate.startswith("08") or sqlstate in _SERVER_GOING_AWAY


def _translate(exc: Exception, state: _State) -> click.ClickException | None:
    """The ClickException an expected failure becomes; None for a real bug."""
    where = f" ({state.url_text})" if state.url_text else ""
    if isinstance(exc, SchemaNotMigrated):
        return DatabaseUnavailable(str(exc))
    if _unreachable(exc):
        return DatabaseUnavailable(f"cannot reach the database{where}: {first_line(exc)}")
    if isinstance(exc, InvalidMail) and exc.field == "schema":
        return click.UsageError(str(exc))
    if isinstance(exc, (MailOutboxError, sa.exc.DBAPIError)):
        return Failed(first_line(exc))
    from .demo import DemoError

    if isinstance(exc, DemoError):
        return Failed(str(exc))
    return None


# click >= 8.2 raises it for a group run without a command; older ones print the help and exit.
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _State:
    """Per-invocation state the error handler needs (set by the commands)."""

    def __init__(self) -> None:
        self.url_text = ""


class MailoutboxCli(click.Group):
    """A click Group whose errors are one line on stderr, with the documented exit codes."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        state = _State()
        extra.setdefault("obj", state)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else EXIT_OK
        except _NO_ARGS_IS_HELP as exc:  # `mailoutbox` (or a group) alone: the help
            click.echo(exc.format_message())
            code = EXIT_USAGE
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            code = EXIT_USAGE
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            code = exc.exit_code
        except click.Abort:
            click.echo("aborted", err=True)
            code = 130
        except BrokenPipeError:  # `mailoutbox deliveries list | head`: the reader left
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            code = EXIT_FAILED
        except Exception as exc:
            translated = _translate(exc, state)
            if translated is None:
                raise
            click.echo(f"error: {translated.format_message()}", err=True)
            code = EXIT_USAGE if isinstance(translated, click.UsageError) else translated.exit_code
        if standalone_mode:
            sys.exit(code)
        return code


# --- parameter types ------------------------------------------------------------------------

if TYPE_CHECKING:  # recent click makes ParamType generic; older releases do not
    from .service import WorkerSettings

    _ParamType = click.ParamType[Any, Any]
else:
    _ParamType = click.ParamType

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(w|d|h|m|s)")
_UNIT_SECONDS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """`30s`, `5m`, `2h`, `30d`, `1w`, `1h30m`, `0.5s` -> timedelta (ValueError if malformed)."""
    value = text.strip().lower()
    position, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not value or position != len(value):
        raise ValueError(
            f"malformed duration {text!r}: use a number and a unit (s, m, h, d, w), "
            "e.g. 30s, 5m, 2h, 30d or 1h30m"
        )
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"duration {text!r} is too long") from None


class DurationType(_ParamType):
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class DatabaseUrlType(_ParamType):
    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, sa.URL):
            return value
        try:
            return database_url(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


DURATION = DurationType()
DATABASE_URL = DatabaseUrlType()


def database_url(text: str) -> sa.URL:
    """A SQLAlchemy URL for psycopg 3 from postgresql://, postgres:// or postgresql+psycopg://."""
    try:
        url = sa.make_url(text.strip())
    except sa.exc.ArgumentError:
        # The text may hold a password: it is not repeated in the message.
        raise ValueError("not a database URL (expected postgresql://user@host:5432/db)") from None
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return url.set(drivername="postgresql+psycopg")
    raise ValueError(
        f"unsupported database URL scheme {url.drivername!r}: mailoutbox needs PostgreSQL "
        "(postgresql:// or postgresql+psycopg://)"
    )


def _check_schema(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return validate_schema_name(value)
    except InvalidMail as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def database_options(*, schema_envvar: str | None = "MAILOUTBOX_SCHEMA") -> Callable[[F], F]:
    """--database-url (DATABASE_URL) and --schema (MAILOUTBOX_SCHEMA)."""

    def decorate(f: F) -> F:
        f = click.option(
            "--schema",
            envvar=schema_envvar,
            default=DEFAULT_SCHEMA if schema_envvar else None,
            show_default=bool(schema_envvar),
            show_envvar=bool(schema_envvar),
            callback=_check_schema,
            help="PostgreSQL schema holding the outbox tables.",
        )(f)
        f = click.option(
            "--database-url",
            envvar="DATABASE_URL",
            show_envvar=True,
            type=DATABASE_URL,
            help="PostgreSQL URL; postgresql:// is used through psycopg 3.",
        )(f)
        return f

    return decorate


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def paging_options(f: F) -> F:
    f = click.option(
        "--limit",
        type=click.IntRange(1, MAX_LIMIT),
        default=50,
        show_default=True,
        help="Rows per page.",
    )(f)
    f = click.option(
        "--offset",
        type=click.IntRange(0, MAX_OFFSET),
        default=0,
        show_default=True,
        help="Rows to skip.",
    )(f)
    return f


# --- wiring -----------------------------------------------------------------------------------


def connect_args_for(url: sa.URL) -> dict[str, Any]:
    """Give up connecting after 10 s and name the application, unless the URL says otherwise."""
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = 10
    if "application_name" not in url.query:
        connect_args["application_name"] = "mailoutbox"
    return connect_args


def make_engine(url: sa.URL, **kwargs: Any) -> sa.Engine:
    """An Engine with `connect_args_for(url)`."""
    return sa.create_engine(url, connect_args=connect_args_for(url), **kwargs)


def open_engine(ctx: click.Context, url: sa.URL | None, **kwargs: Any) -> sa.Engine:
    if url is None:
        raise click.UsageError("no database configured: pass --database-url or set DATABASE_URL")
    state = ctx.find_object(_State)
    if state is not None:
        state.url_text = url.render_as_string(hide_password=True)
    engine = make_engine(url, **kwargs)
    ctx.call_on_close(engine.dispose)
    return engine


def open_outbox(ctx: click.Context, url: sa.URL | None, schema: str, **kwargs: Any) -> Outbox:
    return Outbox(open_engine(ctx, url, **kwargs), schema=schema)


def console() -> Console:
    """Rich output on stdout; into a pipe or file, 200 columns unless COLUMNS says otherwise."""
    out = Console(highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(highlight=False, width=200)
    return out


def to_jsonable(value: Any) -> Any:
    """Records, enums, UUIDs, datetimes and bytes as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(to_jsonable(k)): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def print_json(data: Any) -> None:
    click.echo(json.dumps(to_jsonable(data), indent=2, ensure_ascii=False))


def _when(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _print_version(ctx: click.Context) -> None:
    from importlib import metadata

    try:
        version = metadata.version("mailoutbox")
    except metadata.PackageNotFoundError:  # a checkout on sys.path, not installed
        version = "(not installed)"
    click.echo(f"mailoutbox {version}")
    ctx.exit(EXIT_OK)


# --- the commands ---------------------------------------------------------------------------


@click.group(
    name="mailoutbox", cls=MailoutboxCli, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=lambda ctx, param, value: _print_version(ctx) if value else None,
    help="Show the version and exit.",
)
def cli() -> None:
    """mailoutbox: a PostgreSQL-backed transactional mail outbox.

    Exit codes: 0 ok, 1 operation failed (e.g. unknown delivery), 2 usage
    error, 3 database unreachable or not migrated.
    """


@cli.command()
@database_options()
@click.option("--sql", is_flag=True, help="Print the DDL for a DBA instead of running it.")
@json_option
@click.pass_context
def migrate(
    ctx: click.Context, database_url: sa.URL | None, schema: str, sql: bool, as_json: bool
) -> None:
    """Create or upgrade the outbox tables (alembic upgrade head); idempotent."""
    from .migrations import migrate as run_migrations
    from .migrations import upgrade_sql

    if sql:
        click.echo(upgrade_sql(schema), nl=False)
        return
    engine = open_engine(ctx, database_url, poolclass=sa.pool.NullPool)
    run_migrations(engine, schema)
    revision = _current_revision(engine, schema)
    if as_json:
        print_json({"schema": schema, "revision": revision})
    else:
        click.echo(f"schema {schema!r} is at revision {revision} (head)")


def _current_revision(engine: sa.Engine, schema: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE, "version_table_schema": schema}
        )
        return context.get_current_revision()


@cli.command()
@database_options()
@json_option
@click.pass_context
def status(ctx: click.Context, database_url: sa.URL | None, schema: str, as_json: bool) -> None:
    """Deliveries per state, the oldest due delivery's age and the leases in flight."""
    outbox = open_outbox(ctx, database_url, schema, poolclass=sa.pool.NullPool)
    counts = outbox.count_by_status()
    oldest, leased = outbox.queue_health()
    if as_json:
        print_json(
            {
                "deliveries": {s.value: counts[s] for s in Status},
                "total": sum(counts.values()),
                "oldest_due_age_seconds": round(oldest, 3),
                "leases_in_flight": leased,
            }
        )
        return
    table = Table(title=f"mailoutbox ({schema})")
    table.add_column("state")
    table.add_column("deliveries", justify="right")
    for s in Status:
        table.add_row(s.value, str(counts[s]))
    table.add_row("[bold]total[/]", f"[bold]{sum(counts.values())}[/]")
    out = console()
    out.print(table)
    out.print(f"oldest due delivery waiting: {format_duration(oldest)}")
    out.print(f"leases in flight: {leased}")


@cli.group()
def deliveries() -> None:
    """List deliveries, or show one with its recipients and attempts."""


@deliveries.command("list")
@database_options()
@click.option(
    "--status",
    "status_",
    type=click.Choice([s.value for s in Status]),
    help="Only deliveries in this state.",
)
@click.option("--template", help="Only deliveries of this template id.")
@paging_options
@json_option
@click.pass_context
def deliveries_list(
    ctx: click.Context,
    database_url: sa.URL | None,
    schema: str,
    status_: str | None,
    template: str | None,
    offset: int,
    limit: int,
    as_json: bool,
) -> None:
    """Deliveries, newest first."""
    outbox = open_outbox(ctx, database_url, schema, poolclass=sa.pool.NullPool)
    page = outbox.list_deliveries(offset=offset, limit=limit, status=status_, template_id=template)
    if as_json:
        print_json({"total": page.total, "offset": offset, "limit": limit, "items": page.items})
        return
    table = Table()
    table.add_column("delivery id", no_wrap=True)
    for name in ("status", "tries", "template", "key", "created", "next attempt"):
        table.add_column(name, justify="right" if name == "tries" else "left", no_wrap=True)
    table.add_column("last error")
    for d in page.items:
        table.add_row(
            str(d.delivery_id),
            d.status.value,
            str(d.attempts),
            d.template_id,
            d.idempotency_key,
            _when(d.created_at),
            _when(d.next_attempt_at),
            _short(d.last_error, 40),
        )
    out = console()
    out.print(table)
    shown = f"{offset + 1}-{offset + len(page.items)}" if page.items else "none"
    out.print(f"showing {shown} of {page.total}")


@deliveries.command("show")
@database_options()
@click.argument("delivery_id")
@json_option
@click.pass_context
def deliveries_show(
    ctx: click.Context, database_url: sa.URL | None, schema: str, delivery_id: str, as_json: bool
) -> None:
    """One delivery: its fields, its recipients and every attempt."""
    outbox = open_outbox(ctx, database_url, schema, poolclass=sa.pool.NullPool)
    delivery = outbox.get_delivery(delivery_id)
    recipients = outbox.list_recipients(delivery.delivery_id)
    attempts = outbox.list_attempts(delivery.delivery_id)
    payload = outbox.get_payload(delivery.delivery_id)
    if as_json:
        print_json(
            {
                "delivery": delivery,
                "subject": payload.subject,
                "content_type": payload.content_type,
                "sender": payload.sender,
                "recipients": recipients,
                "attempts": attempts,
            }
        )
        return
    out = console()
    fields = Table(show_header=False, title=f"delivery {delivery.delivery_id}")
    fields.add_column("field", style="bold")
    fields.add_column("value")
    for name, value in _delivery_fields(delivery):
        fields.add_row(name, value)
    fields.add_row("subject", payload.subject or "")
    fields.add_row("content type", payload.content_type)
    fields.add_row("sender", payload.sender)
    out.print(fields)
    out.print(_recipients_table(delivery, recipients))
    out.print(_attempts_table(attempts))


def _recipients_table(delivery: Delivery, recipients: Sequence[Recipient]) -> Table:
    """The recipients; for a mail retried for some of them, which ones an earlier
    attempt settled (reached them, or saw them refused for good)."""
    people = Table(title="recipients")
    people.add_column("kind")
    people.add_column("address")
    settled = {envelope_key(address) for address in delivery.settled_recipients}
    if settled:
        people.add_column("settled earlier")
    for r in recipients:
        row = [r.kind.value, r.address]
        if settled:
            row.append("yes" if envelope_key(envelope_address(r.address)) in settled else "")
        people.add_row(*row)
    return people


def _delivery_fields(d: Delivery) -> Iterator[tuple[str, str]]:
    yield "template", d.template_id
    yield "idempotency key", d.idempotency_key
    yield "status", d.status.value
    yield "attempts (this cycle)", str(d.attempts)
    yield "created", _when(d.created_at)
    yield "updated", _when(d.updated_at)
    yield "next attempt", _when(d.next_attempt_at)
    yield "sent", _when(d.sent_at)
    yield "dead-lettered", _when(d.dead_lettered_at)
    yield "expires", _when(d.expires_at)
    yield "leased by", f"{d.locked_by} until {_when(d.locked_until)}" if d.locked_by else ""
    yield "last error", d.last_error


def _attempts_table(attempts: Sequence[Attempt]) -> Table:
    table = Table(title=f"attempts ({len(attempts)})")
    for name in ("#", "started", "outcome", "smtp", "duration", "worker"):
        table.add_column(name, no_wrap=True)
    table.add_column("error")
    for a in attempts:
        smtp = " ".join(x for x in (str(a.smtp_code or ""), a.smtp_enhanced_code or "") if x)
        duration = ""
        if a.finished_at is not None:
            duration = f"{(a.finished_at - a.started_at).total_seconds() * 1000:.0f} ms"
        table.add_row(
            str(a.attempt_no),
            _when(a.started_at),
            a.outcome.value,
            smtp,
            duration,
            a.worker or "",
            _short(a.error or _refusals(a.refused), 80),
        )
    return table


def _refusals(refused: dict[str, Any] | None) -> str:
    """A sent attempt's refused recipients, which only --json showed before."""
    if not refused:
        return ""
    return f"refused {len(refused)}: " + "; ".join(
        " ".join(str(part) for part in (address, *reply)) for address, reply in refused.items()
    )


@cli.command("dead-letters")
@database_options()
@paging_options
@json_option
@click.pass_context
def dead_letters(
    ctx: click.Context,
    database_url: sa.URL | None,
    schema: str,
    offset: int,
    limit: int,
    as_json: bool,
) -> None:
    """Dead letters (deliveries given up on, and why), newest first."""
    outbox = open_outbox(ctx, database_url, schema, poolclass=sa.pool.NullPool)
    page = outbox.list_dead_letters(offset=offset, limit=limit)
    if as_json:
        print_json({"total": page.total, "offset": offset, "limit": limit, "items": page.items})
        return
    table = Table()
    table.add_column("delivery id", no_wrap=True)
    table.add_column("archived", no_wrap=True)
    table.add_column("reason")
    letter: DeadLetter
    for letter in page.items:
        table.add_row(str(letter.delivery_id), _when(letter.archived_at), _short(letter.reason, 80))
    out = console()
    out.print(table)
    shown = f"{offset + 1}-{offset + len(page.items)}" if page.items else "none"
    out.print(f"showing {shown} of {page.total}")


def _each(
    ctx: click.Context,
    action: Callable[[str], Delivery],
    ids: Sequence[str],
    verb: str,
    as_json: bool,
) -> None:
    """Apply `action` to every id and report each, whatever happens to the others.

    Exits with the worst code met: 1 if any failed (unknown id, a transition its
    state refuses, a statement timeout), 3 if the database could not be reached.
    """
    results: list[dict[str, Any]] = []
    worst = EXIT_OK
    for delivery_id in ids:
        try:
            delivery = action(delivery_id)
        except Exception as exc:
            failure = _translate(exc, ctx.find_object(_State) or _State())
            if failure is None or isinstance(failure, click.UsageError):
                raise
            worst = max(worst, failure.exit_code)
            message = failure.format_message()
            results.append({"delivery_id": delivery_id, "ok": False, "error": message})
            if not as_json:
                click.echo(f"error: {message}", err=True)
            continue
        results.append(
            {"delivery_id": str(delivery.delivery_id), "ok": True, "status": delivery.status.value}
        )
        if not as_json:
            click.echo(f"{verb} {delivery.delivery_id}: now {delivery.status.value}")
    if as_json:
        print_json(results)
    if worst != EXIT_OK:
        raise click.exceptions.Exit(worst)


@cli.command()
@database_options()
@click.argument("delivery_ids", nargs=-1, required=True, metavar="ID...")
@json_option
@click.pass_context
def resend(
    ctx: click.Context,
    database_url: sa.URL | None,
    schema: str,
    delivery_ids: tuple[str, ...],
    as_json: bool,
) -> None:
    """Send deliveries again: a fresh cycle of attempts, due now (not for sent ones)."""
    outbox = open_outbox(ctx, database_url, schema, poolclass=sa.pool.NullPool)
    _each(ctx, outbox.resend, delivery_ids, "resent", as_json)


@cli.command()
@database_options()
@click.argument("delivery_ids", nargs=-1, required=True, metavar="ID...")
@json_option
@click.pass_context
def cancel(
    ctx: click.Context,
    database_url: sa.URL | None,
    schema: str,
    delivery_ids: tuple[str, ...],
    as_json: bool,
) -> None:
    """Cancel pending or retrying deliveries; they will not be sent."""
    outbox = open_outbox(ctx, database_url, schema, poolclass=sa.pool.NullPool)
    _each(ctx, outbox.cancel, delivery_ids, "cancelled", as_json)


@cli.command()
@database_options()
@click.option(
    "--older-than",
    type=DURATION,
    required=True,
    help="Age since the last change, e.g. 30d, 12h, 1h30m.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_PURGE_BATCH),
    default=1000,
    show_default=True,
    help="Deliveries deleted per transaction.",
)
@json_option
@click.pass_context
def purge(
    ctx: click.Context,
    database_url: sa.URL | None,
    schema: str,
    older_than: timedelta,
    batch_size: int,
    as_json: bool,
) -> None:
    """Delete finished deliveries (sent, dead-lettered, cancelled) older than --older-than."""
    if older_than > MAX_PURGE_AGE:
        raise click.BadParameter(
            f"at most {MAX_PURGE_AGE.days} days (nothing is older)", param_hint="--older-than"
        )
    outbox = open_outbox(ctx, database_url, schema, poolclass=sa.pool.NullPool)
    purged = outbox.purge(older_than, batch_size=batch_size)
    if as_json:
        print_json({"purged": purged, "older_than_seconds": older_than.total_seconds()})
    else:
        click.echo(
            f"purged {purged} deliveries older than {format_duration(older_than.total_seconds())}"
        )


# --- worker -------------------------------------------------------------------------------


def _positive(ctx: click.Context, param: click.Parameter, value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise click.BadParameter("must be longer than 0s", ctx, param)
    return value


def _read_password(password_file: Path | None) -> str | None:
    from_env = os.environ.get(PASSWORD_ENV)
    if password_file is not None and from_env is not None:
        raise click.UsageError(
            f"the SMTP password is given twice: set {PASSWORD_ENV} or --smtp-password-file, "
            "not both"
        )
    if password_file is not None:
        try:
            text = password_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise click.UsageError(
                f"cannot read --smtp-password-file {str(password_file)!r}: {exc.strerror}"
            ) from None
        return text.rstrip("\r\n")
    return from_env


@cli.command()
@database_options()
@click.option(
    "--smtp-host",
    envvar="MAILOUTBOX_SMTP_HOST",
    show_envvar=True,
    required=True,
    help="SMTP server (relay or submission service).",
)
@click.option(
    "--smtp-port",
    envvar="MAILOUTBOX_SMTP_PORT",
    show_envvar=True,
    type=click.IntRange(1, 65535),
    help="Default: 587 (starttls), 465 (tls), 25 (none).",
)
@click.option(
    "--smtp-security",
    envvar="MAILOUTBOX_SMTP_SECURITY",
    show_envvar=True,
    type=click.Choice(["starttls", "tls", "none"]),
    default="starttls",
    show_default=True,
    help="none is plain text: for a relay on loopback only.",
)
@click.option(
    "--smtp-username",
    envvar="MAILOUTBOX_SMTP_USERNAME",
    show_envvar=True,
    help=f"Log in as this user; the password comes from {PASSWORD_ENV} or --smtp-password-file.",
)
@click.option(
    "--smtp-password-file",
    envvar="MAILOUTBOX_SMTP_PASSWORD_FILE",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="File holding the SMTP password (one line).",
)
@click.option(
    "--smtp-timeout",
    envvar="MAILOUTBOX_SMTP_TIMEOUT",
    show_envvar=True,
    type=DURATION,
    default="30s",
    show_default=True,
    callback=_positive,
    help="Limit on each network operation with the SMTP server.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Deliveries leased per claim.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 512),
    default=8,
    show_default=True,
    help="Sends in flight at once (threads).",
)
@click.option(
    "--lease",
    type=DURATION,
    default="5m",
    show_default=True,
    callback=_positive,
    help="How long a claim holds a delivery; must exceed the longest send.",
)
@click.option(
    "--poll-interval",
    type=DURATION,
    default="5s",
    show_default=True,
    callback=_positive,
    help="Look for due mail this often without a notification.",
)
@click.option(
    "--no-listen",
    is_flag=True,
    help="Do not LISTEN for new mail (behind a transaction-mode pooler); poll only.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(1, 1000),
    default=8,
    show_default=True,
    help="Attempts per cycle before dead-lettering.",
)
@click.option(
    "--retry-base-delay",
    type=DURATION,
    default="30s",
    show_default=True,
    help="Backoff ceiling after the first failure (doubles each time).",
)
@click.option(
    "--retry-max-delay", type=DURATION, default="1h", show_default=True, help="Cap on the backoff."
)
@click.option(
    "--max-age",
    type=DURATION,
    default="2d",
    show_default=True,
    callback=_positive,
    help="Give up on a delivery whose cycle began longer ago.",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Worker processes to run and keep running (one Python process uses one core).",
)
@click.option(
    "--name",
    help="Worker name in leases and attempts [default: host:pid:random]; "
    "with --processes, NAME-1 ... NAME-N.",
)
@click.option("--message-id-domain", help="Domain of Message-IDs [default: sender's domain].")
@click.option(
    "--metrics-port",
    envvar="MAILOUTBOX_METRICS_PORT",
    show_envvar=True,
    type=click.IntRange(0, 65535),
    help="Serve Prometheus metrics on this port (needs mailoutbox[metrics]); "
    "with --processes, process i serves on PORT+i-1.",
)
@click.option(
    "--metrics-host",
    envvar="MAILOUTBOX_METRICS_HOST",
    show_envvar=True,
    default="0.0.0.0",
    show_default=True,
    help="Address the metrics endpoint binds.",
)
@click.option(
    "--log-level",
    envvar="MAILOUTBOX_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--log-format",
    envvar="MAILOUTBOX_LOG_FORMAT",
    show_envvar=True,
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
)
@click.pass_context
def worker(
    ctx: click.Context,
    database_url: sa.URL | None,
    schema: str,
    smtp_host: str,
    smtp_port: int | None,
    smtp_security: str,
    smtp_username: str | None,
    smtp_password_file: Path | None,
    smtp_timeout: timedelta,
    batch_size: int,
    concurrency: int,
    lease: timedelta,
    poll_interval: timedelta,
    no_listen: bool,
    max_attempts: int,
    retry_base_delay: timedelta,
    retry_max_delay: timedelta,
    max_age: timedelta,
    processes: int,
    name: str | None,
    message_id_domain: str | None,
    metrics_port: int | None,
    metrics_host: str,
    log_level: str,
    log_format: str,
) -> None:
    """Deliver mail until SIGTERM or Ctrl-C, then finish the sends in flight and exit 0.

    With --processes N, this process supervises N worker processes: it starts
    one again when it dies (after a back-off from 1 s to 60 s), passes SIGTERM
    on to all of them, and exits 0 once they have finished their sends.
    """
    from .logs import configure_logging
    from .retry import RetryPolicy
    from .service import (
        MAX_OVERFLOW,
        POOL_SIZE,
        MetricsUnavailable,
        SmtpSettings,
        WorkerSettings,
        require_ready,
        serve_worker,
    )

    password = _read_password(smtp_password_file)
    if (smtp_username is None) != (password is None):
        raise click.UsageError(
            "--smtp-username needs a password "
            f"({PASSWORD_ENV} or --smtp-password-file), and a password needs --smtp-username"
        )
    if metrics_port and metrics_port + processes - 1 > 65535:
        raise click.UsageError(
            f"--metrics-port {metrics_port} with --processes {processes}: process i serves"
            f" on PORT+i-1, and {metrics_port + processes - 1} is past 65535"
        )
    if metrics_port is not None:
        try:
            from . import metrics  # noqa: F401  (only to fail early without prometheus-client)
        except ImportError as exc:
            raise click.UsageError(f"--metrics-port: {exc}") from None
    try:
        retry = RetryPolicy(
            max_attempts=max_attempts,
            base_delay=retry_base_delay,
            max_delay=retry_max_delay,
            max_age=max_age,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    outbox = open_outbox(ctx, database_url, schema, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
    url = outbox.engine.url
    settings = WorkerSettings(
        url=url,
        schema=schema,
        smtp=SmtpSettings(
            host=smtp_host,
            port=smtp_port,
            security=smtp_security,
            username=smtp_username,
            password=password,
            timeout=smtp_timeout.total_seconds(),
        ),
        retry=retry,
        batch_size=batch_size,
        concurrency=concurrency,
        lease=lease,
        poll_interval=poll_interval,
        listen=not no_listen,
        name=name,
        message_id_domain=message_id_domain,
        metrics_port=metrics_port,
        metrics_host=metrics_host,
        connect_args=tuple(connect_args_for(url).items()),
    )
    # Settings the Worker or the transport refuse are usage errors, found here, once.
    try:
        settings.worker(outbox)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    ctx.call_on_close(configure_logging(log_level, log_format).restore)
    try:
        if processes == 1:
            serve_worker(settings, outbox.engine)
            return
        require_ready(outbox)  # fail fast (exit 3) in the supervisor
        outbox.engine.dispose()  # the children connect on their own
        _supervise_workers(processes, settings, log_level, log_format)
    except MetricsUnavailable as exc:
        raise Failed(str(exc)) from None


def _supervise_workers(
    processes: int, settings: WorkerSettings, log_level: str, log_format: str
) -> None:
    import functools

    from .service import serve_supervised
    from .supervisor import supervise

    log.info("supervising %d worker processes", processes)
    supervise(processes, functools.partial(serve_supervised, settings, log_level, log_format))


# --- demo -----------------------------------------------------------------------------------


@cli.command()
@database_options(schema_envvar=None)
@click.option(
    "--count",
    type=click.IntRange(1, 1_000_000),
    default=2000,
    show_default=True,
    help="Mails to enqueue.",
)
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=100, show_default=True)
@click.option(
    "--timeout",
    type=DURATION,
    default="60s",
    show_default=True,
    callback=_positive,
    help="Give up (exit 1) if the worker has not drained the outbox by then.",
)
@click.option(
    "--keep-schema",
    is_flag=True,
    help="With --database-url: keep the demo's schema instead of dropping it.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
)
@click.pass_context
def demo(
    ctx: click.Context,
    database_url: sa.URL | None,
    schema: str | None,
    count: int,
    concurrency: int,
    batch_size: int,
    timeout: timedelta,
    keep_schema: bool,
    log_level: str,
) -> None:
    """Run the whole job on a throw-away database and a local SMTP sink, then check it.

    Without --database-url or DATABASE_URL it starts an embedded PostgreSQL
    (the mailoutbox[demo] extra) and deletes it afterwards; with one, it works
    in a schema of its own (default mailoutbox_demo) and drops it afterwards.
    Exits 1 if any delivery did not end in the expected state.
    """
    from .demo import run_demo
    from .logs import configure_logging

    ctx.call_on_close(configure_logging(log_level).restore)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a `timeout`, a CI runner) ends the demo as Ctrl-C does, so its
        # server and schema go with it; by default it killed the process on the spot.
        previous = signal.signal(signal.SIGTERM, _interrupt)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, previous))
    state = ctx.find_object(_State)
    if state is not None and database_url is not None:
        state.url_text = database_url.render_as_string(hide_password=True)
    result = run_demo(
        database_url=database_url,
        schema=schema,
        count=count,
        concurrency=concurrency,
        batch_size=batch_size,
        timeout=timeout.total_seconds(),
        keep_schema=keep_schema,
        console=console(),
    )
    if not result.ok:
        raise click.exceptions.Exit(EXIT_FAILED)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script `mailoutbox`."""
    cli.main(args=argv, prog_name="mailoutbox")
    raise AssertionError("unreachable: cli.main exits")  # pragma: no cover


__all__ = [
    "EXIT_DATABASE",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "cli",
    "database_url",
    "format_duration",
    "main",
    "parse_duration",
]

if __name__ == "__main__":
    main()
