"""`mailoutbox demo`: the whole job in one command, on a throw-away database.

Starts an embedded PostgreSQL (or uses the database it is given, in a schema
of its own), migrates it, starts a local SMTP sink (devsink.DevSink) that
greylists some addresses and refuses others, enqueues a realistic mix of
mail, runs a Worker until nothing is left to do, prints what happened and
checks that every delivery ended where it should. Everything it started is
stopped before it returns, on success, failure or Ctrl-C alike.

It reads no environment and no configuration: the command line passes every
setting in (see cli.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import sqlalchemy as sa
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .devsink import DevSink
from .logs import format_duration
from .mail import Mail
from .migrations import migrate
from .outbox import Outbox
from .records import Attempt, Enqueued
from .retry import RetryPolicy
from .schema import ACTIVE_STATUSES, DEFAULT_SCHEMA, Status, validate_schema_name
from .transports.smtp import SmtpTransport
from .worker import Worker

DEMO_SCHEMA = "mailoutbox_demo"
DEFAULT_COUNT = 2000
SENDER = "Demo Shop <noreply@shop.example>"
TEMPLATES = ("welcome", "order-confirmation", "password-reset", "invoice", "weekly-digest")
# Short retry delays, so greylisted mail is retried and sent within the run.
DEMO_RETRY = RetryPolicy(
    max_attempts=5,
    base_delay=timedelta(seconds=0.2),
    max_delay=timedelta(seconds=1),
    max_age=None,
)
ENQUEUE_CHUNK = 500
# duplicate_schema; unique_violation when another session creates it at the same moment.
_DUPLICATE_SCHEMA = ("42P06", "23505")


class DemoError(Exception):
    """The demo could not run (as opposed to: it ran and a check failed)."""


# --- the mix of mail (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class PlannedMail:
    """One mail of the demo and where it must end."""

    mail_index: int
    template_id: str
    idempotency_key: str
    to: str
    cc: str | None
    html: bool
    expected: Status
    greylisted: bool = False
    duplicate_of: int | None = None


def plan_mails(count: int) -> list[PlannedMail]:
    """The demo's mix: mostly plain mail; html, cc, greylisted, refused and duplicate ones.

    About 2% go to an address the sink refuses for good (dead-lettered), 5% to
    one it greylists once (retried, then sent), 20% carry an HTML part, and
    0.5% (at least one, from 20 mails up) repeat an earlier mail's idempotency
    key, so enqueue collapses them into the existing delivery.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    duplicates = max(1, count // 200) if count >= 20 else 0
    originals = count - duplicates
    plan: list[PlannedMail] = []
    for i in range(originals):
        template = TEMPLATES[i % len(TEMPLATES)]
        key = f"demo-{i:05d}"
        if i % 50 == 7:
            plan.append(
                PlannedMail(
                    i, template, key, f"user{i}@example.invalid", None, False, Status.DEAD_LETTERED
                )
            )
        elif i % 20 == 3:
            plan.append(
                PlannedMail(
                    i,
                    template,
                    key,
                    f"greylisted{i}@example.net",
                    None,
                    i % 5 == 0,
                    Status.SENT,
                    greylisted=True,
                )
            )
        else:
            cc = f"accounts{i}@example.org" if i % 11 == 0 else None
            plan.append(
                PlannedMail(i, template, key, f"user{i}@example.com", cc, i % 5 == 0, Status.SENT)
            )
    # Duplicates: the same (template, key) enqueued again, spread over the run.
    step = max(1, originals // max(1, duplicates))
    for n in range(duplicates):
        original = plan[(n * step + 1) % originals]
        plan.append(
            PlannedMail(
                originals + n,
                original.template_id,
                original.idempotency_key,
                original.to,
                original.cc,
                original.html,
                original.expected,
                greylisted=original.greylisted,
                duplicate_of=original.mail_index,
            )
        )
    return plan


def to_mail(planned: PlannedMail) -> Mail:
    subject = f"{planned.template_id.replace('-', ' ').capitalize()} #{planned.mail_index}"
    text = (
        f"Hello,\n\nthis is {planned.template_id} mail number {planned.mail_index} "
        "from the mailoutbox demo.\n\nRegards,\nthe demo shop\n"
    )
    html = (
        f"<p>Hello,</p><p>this is <b>{planned.template_id}</b> mail number "
        f"{planned.mail_index} from the mailoutbox demo.</p>"
        if planned.html
        else None
    )
    return Mail(
        template_id=planned.template_id,
        idempotency_key=planned.idempotency_key,
        to=[planned.to],
        cc=[planned.cc] if planned.cc else [],
        subject=subject,
        text=text,
        html=html,
    )


# --- running it ---------------------------------------------------------------------------


@dataclass
class Check:
    description: str
    ok: bool
    detail: str = ""


@dataclass
class DemoResult:
    """What the demo did and whether every check held."""

    counts: dict[Status, int]
    enqueued: int
    deliveries: int
    elapsed_seconds: float
    throughput: float
    checks: list[Check] = field(default_factory=list)
    retried_id: uuid.UUID | None = None
    dead_lettered_id: uuid.UUID | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def run_demo(
    *,
    database_url: sa.URL | None = None,
    schema: str | None = None,
    count: int = DEFAULT_COUNT,
    concurrency: int = 4,
    batch_size: int = 100,
    timeout: float = 60.0,
    keep_schema: bool = False,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo and print its report to `console`; see the module docstring.

    Without `database_url` an embedded PostgreSQL is started (schema
    `mailoutbox` unless `schema` says otherwise) and deleted afterwards. With
    it, the demo works in `schema` (default `mailoutbox_demo`), which must not
    exist yet, and drops it afterwards unless `keep_schema`. Raises DemoError
    when it cannot run; a failed check is reported in the result (`ok`).
    """
    console = console or Console()
    if count < 1:
        raise DemoError("--count must be at least 1")
    if importlib.util.find_spec("aiosmtpd") is None:
        # Found before any database is touched (the sink starts after the migration).
        raise DemoError('the demo\'s SMTP sink needs aiosmtpd: pip install "mailoutbox[demo]"')
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if database_url is None:
            console.print("[bold]Starting an embedded PostgreSQL[/] (pip-installed server) ...")
            url = stack.enter_context(_embedded())
            schema = validate_schema_name(schema or DEFAULT_SCHEMA)
        else:
            url = database_url
            schema = validate_schema_name(schema or DEMO_SCHEMA)
        engine = sa.create_engine(url, pool_size=concurrency + 4, max_overflow=4)
        stack.callback(engine.dispose)
        if database_url is not None:
            _claim_schema(engine, schema)
            if not keep_schema:
                stack.callback(_drop_schema, engine, schema)
        migrate(engine, schema)
        console.print(
            f"  database ready, schema [cyan]{schema}[/] migrated "
            f"({time.monotonic() - started:.1f}s)"
        )
        sink = stack.enter_context(DevSink())
        console.print(
            f"[bold]SMTP sink[/] on {sink.host}:{sink.port}: accepts mail, greylists "
            "greylisted*@ addresses once (451), refuses @*.invalid for good (550 5.1.1)"
        )
        outbox = Outbox(engine, schema=schema, default_sender=SENDER)
        result = _run(outbox, sink, count, concurrency, batch_size, timeout, console)
        _report(outbox, result, console)
        if database_url is not None and keep_schema:
            console.print(f"schema [cyan]{schema}[/] kept; inspect it with mailoutbox status")
    console.print(f"demo finished in {time.monotonic() - started:.1f}s, nothing left running")
    return result


@contextlib.contextmanager
def _embedded() -> Iterator[sa.URL]:
    from .embedded import embedded_postgres

    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; the server then uses /tmp.
        warnings.filterwarnings("ignore", module=r"platformdirs(\..*)?")
        cm = embedded_postgres(prefix="mailoutbox-demo-pg-")
        try:
            url = cm.__enter__()
        except RuntimeError as exc:
            raise DemoError(str(exc)) from exc
    try:
        yield url
    finally:
        cm.__exit__(None, None, None)


def _claim_schema(engine: sa.Engine, schema: str) -> None:
    """Create the demo's schema, or refuse one that exists.

    One statement: a look before creating let two demos on one database both
    take the same schema, and the first to finish dropped it under the other.
    """
    try:
        with engine.begin() as conn:
            conn.execute(sa.schema.CreateSchema(schema))
    except sa.exc.DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) not in _DUPLICATE_SCHEMA:
            raise
        raise DemoError(
            f"schema {schema!r} exists already in that database; the demo needs a schema of "
            "its own, which it drops afterwards: pass another --schema"
        ) from None


def _drop_schema(engine: sa.Engine, schema: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.schema.DropSchema(schema, cascade=True, if_exists=True))


def _enqueue(outbox: Outbox, mails: Sequence[Mail]) -> list[Enqueued]:
    results: list[Enqueued] = []
    for start in range(0, len(mails), ENQUEUE_CHUNK):
        # The host-application shape: enqueue inside a transaction the caller owns.
        with outbox.engine.begin() as conn:
            results += outbox.enqueue_many(mails[start : start + ENQUEUE_CHUNK], connection=conn)
    return results


def _run(
    outbox: Outbox,
    sink: DevSink,
    count: int,
    concurrency: int,
    batch_size: int,
    timeout: float,
    console: Console,
) -> DemoResult:
    plan = plan_mails(count)
    t0 = time.monotonic()
    enqueued = _enqueue(outbox, [to_mail(p) for p in plan])
    unique = {e.delivery_id for e in enqueued}
    console.print(
        f"[bold]Enqueued[/] {len(plan)} mails with enqueue_many in "
        f"{time.monotonic() - t0:.2f}s: {len(unique)} deliveries "
        f"({len(plan) - len(unique)} duplicate keys collapsed)"
    )
    transport = SmtpTransport(sink.host, sink.port, security="none", timeout=10.0)
    worker = Worker(
        outbox,
        transport,
        retry=DEMO_RETRY,
        batch_size=batch_size,
        concurrency=concurrency,
        poll_interval=timedelta(seconds=0.1),
        name="demo-worker",
    )
    stop = threading.Event()
    thread = threading.Thread(
        target=worker.run, args=(stop,), kwargs={"handle_signals": False}, name="demo-worker"
    )
    started = time.monotonic()
    thread.start()
    drained = False
    try:
        drained = _follow(outbox, len(unique), started + timeout, console)
    finally:
        stop.set()
        thread.join()
    elapsed = time.monotonic() - started
    counts = outbox.count_by_status()
    finished = counts[Status.SENT] + counts[Status.DEAD_LETTERED]
    result = DemoResult(
        counts=counts,
        enqueued=len(plan),
        deliveries=len(unique),
        elapsed_seconds=elapsed,
        throughput=finished / elapsed if elapsed > 0 else 0.0,
    )
    result.checks = _checks(outbox, sink, plan, enqueued, counts, drained, timeout)
    by_index = {p.mail_index: e for p, e in zip(plan, enqueued, strict=True)}
    result.retried_id = next(
        (by_index[p.mail_index].delivery_id for p in plan if p.greylisted), None
    )
    result.dead_lettered_id = next(
        (by_index[p.mail_index].delivery_id for p in plan if p.expected is Status.DEAD_LETTERED),
        None,
    )
    return result


def _follow(outbox: Outbox, total: int, deadline: float, console: Console) -> bool:
    """Show a live progress bar until nothing is active; False if the deadline passed."""
    columns = (
        SpinnerColumn(),
        TextColumn("[bold]delivering"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=total)
        while True:
            counts = outbox.count_by_status()
            done = counts[Status.SENT] + counts[Status.DEAD_LETTERED] + counts[Status.CANCELLED]
            progress.update(
                task,
                completed=done,
                description=(
                    f"sent {counts[Status.SENT]}  retrying {counts[Status.RETRYING]}  "
                    f"dead-lettered {counts[Status.DEAD_LETTERED]}"
                ),
            )
            if not any(counts[s] for s in ACTIVE_STATUSES):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def _ids_with_status(outbox: Outbox, status: Status) -> set[uuid.UUID]:
    ids: set[uuid.UUID] = set()
    offset = 0
    while True:
        page = outbox.list_deliveries(offset=offset, limit=1000, status=status)
        ids.update(d.delivery_id for d in page.items)
        offset += len(page.items)
        if not page.items or offset >= page.total:
            return ids


def _checks(
    outbox: Outbox,
    sink: DevSink,
    plan: Sequence[PlannedMail],
    enqueued: Sequence[Enqueued],
    counts: dict[Status, int],
    drained: bool,
    timeout: float,
) -> list[Check]:
    originals = {p.mail_index: e for p, e in zip(plan, enqueued, strict=True)}
    firsts = [(p, e) for p, e in zip(plan, enqueued, strict=True) if p.duplicate_of is None]
    dupes = [(p, e) for p, e in zip(plan, enqueued, strict=True) if p.duplicate_of is not None]
    expected_dead = {e.delivery_id for p, e in firsts if p.expected is Status.DEAD_LETTERED}
    expected_sent = len(firsts) - len(expected_dead)
    greylisted = sum(1 for p, _ in firsts if p.greylisted)
    dead = _ids_with_status(outbox, Status.DEAD_LETTERED)
    stats = sink.stats()
    checks = [
        Check(
            "the worker drained the outbox",
            drained,
            "" if drained else f"deliveries still active after {format_duration(timeout)}",
        ),
        Check(
            "duplicate keys collapsed into the first delivery",
            all(
                not e.created and e.delivery_id == originals[p.duplicate_of].delivery_id
                for p, e in dupes
                if p.duplicate_of is not None
            )
            and all(e.created for _, e in firsts),
            f"{len(dupes)} duplicates",
        ),
        Check(
            "every mail to a refused address is dead-lettered",
            dead == expected_dead,
            f"{len(dead)} dead-lettered, {len(expected_dead)} expected",
        ),
        Check(
            "every other mail is sent",
            counts[Status.SENT] == expected_sent,
            f"{counts[Status.SENT]} sent, {expected_sent} expected",
        ),
        Check(
            "greylisted mail was refused once, then sent",
            stats.greylisted == greylisted,
            f"{stats.greylisted} greylisted replies, {greylisted} expected",
        ),
        Check(
            "the sink received each sent mail exactly once",
            stats.messages == counts[Status.SENT],
            f"{stats.messages} messages received",
        ),
        Check(
            "nothing pending, retrying, sending or cancelled",
            not any(counts[s] for s in (*ACTIVE_STATUSES, Status.CANCELLED)),
        ),
    ]
    return checks


# --- the report ---------------------------------------------------------------------------


def _report(outbox: Outbox, result: DemoResult, console: Console) -> None:
    table = Table(title="Deliveries per state")
    table.add_column("state")
    table.add_column("count", justify="right")
    for status in Status:
        table.add_row(status.value, str(result.counts.get(status, 0)))
    console.print(table)
    console.print(
        f"[bold]Throughput:[/] {result.throughput:.0f} deliveries/s "
        f"({result.deliveries} deliveries in {result.elapsed_seconds:.2f}s, retries included)"
    )
    if result.retried_id is not None:
        _history(outbox, result.retried_id, "A greylisted delivery (retried, then sent)", console)
    if result.dead_lettered_id is not None:
        _history(outbox, result.dead_lettered_id, "A refused delivery (dead-lettered)", console)
    for check in result.checks:
        mark = "[green]ok[/]  " if check.ok else "[red]FAIL[/]"
        detail = f" ({check.detail})" if check.detail else ""
        console.print(f"{mark} {check.description}{detail}")
    if result.ok:
        console.print("[bold green]every delivery ended in the expected state[/]")
    else:
        console.print("[bold red]some deliveries did not end in the expected state[/]")


def _history(outbox: Outbox, delivery_id: uuid.UUID, title: str, console: Console) -> None:
    delivery = outbox.get_delivery(delivery_id)
    attempts = outbox.list_attempts(delivery_id)
    table = Table(title=f"{title}\n{delivery_id}: {delivery.status.value}")
    for column in ("#", "outcome", "smtp", "duration", "error"):
        table.add_column(column)
    for attempt in attempts:
        table.add_row(*attempt_row(attempt))
    console.print(table)


def attempt_row(attempt: Attempt) -> tuple[str, str, str, str, str]:
    """An attempt as table cells: number, outcome, SMTP code, duration, error."""
    smtp = "" if attempt.smtp_code is None else str(attempt.smtp_code)
    if attempt.smtp_enhanced_code:
        smtp += f" {attempt.smtp_enhanced_code}"
    duration = ""
    if attempt.finished_at is not None:
        millis = (attempt.finished_at - attempt.started_at).total_seconds() * 1000
        duration = f"{millis:.0f} ms"
    return (str(attempt.attempt_no), attempt.outcome.value, smtp, duration, attempt.error)


__all__ = [
    "DEFAULT_COUNT",
    "DEMO_SCHEMA",
    "DemoError",
    "DemoResult",
    "PlannedMail",
    "plan_mails",
    "run_demo",
]
