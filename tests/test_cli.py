"""The `mailoutbox` command line, end to end against real PostgreSQL.

Commands run in-process through click's CliRunner; the long-lived worker runs
in a subprocess against a real SMTP sink and is stopped with SIGTERM.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import mailoutbox
from mailoutbox import Outbox, PermanentSendError, Status, TransientSendError
from mailoutbox.cli import cli, database_url, format_duration, parse_duration
from mailoutbox.logs import configure_logging, redact_addresses
from mailoutbox.retry import RetryPolicy
from mailoutbox.transports.base import Envelope, SendResult
from mailoutbox.transports.memory import MemoryTransport
from mailoutbox.worker import Worker

from .conftest import SCHEMA
from .factories import make_mail, wait_until
from .smtp_sink import SmtpSink

REPO = Path(__file__).resolve().parent.parent
NO_DELAY = RetryPolicy(max_attempts=3, base_delay=timedelta(0), max_delay=timedelta(0))
# Variables the commands read: the tests set what they need and nothing leaks in.
CLEAN_ENV: dict[str, str | None] = {
    name: None
    for name in (
        "DATABASE_URL",
        "MAILOUTBOX_SCHEMA",
        "MAILOUTBOX_SMTP_HOST",
        "MAILOUTBOX_SMTP_PORT",
        "MAILOUTBOX_SMTP_SECURITY",
        "MAILOUTBOX_SMTP_USERNAME",
        "MAILOUTBOX_SMTP_PASSWORD",
        "MAILOUTBOX_SMTP_PASSWORD_FILE",
        "MAILOUTBOX_SMTP_TIMEOUT",
        "MAILOUTBOX_METRICS_PORT",
        "MAILOUTBOX_LOG_LEVEL",
        "MAILOUTBOX_LOG_FORMAT",
    )
}


@pytest.fixture
def outbox(engine: sa.Engine) -> Outbox:
    """The synchronous Outbox: these tests only set data up through it."""
    return Outbox(engine, schema=SCHEMA, default_sender="Shop <noreply@example.com>")


def url_text(url: sa.URL) -> str:
    return url.render_as_string(hide_password=False)


def run(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    """Invoke the CLI in-process with a clean environment and wide tables."""
    environment: dict[str, str | None] = {**CLEAN_ENV, "COLUMNS": "250"}
    environment.update(env or {})
    return CliRunner().invoke(cli, list(args), env=environment, catch_exceptions=False)


def db(url: sa.URL, *args: str) -> tuple[str, ...]:
    return (*args, "--database-url", url_text(url))


def assert_one_line_error(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def tick(outbox: Outbox, handler: Any = None) -> None:
    Worker(outbox, MemoryTransport(handler), retry=NO_DELAY, name="cli-test").tick()


def fail_with(exc: Exception) -> Any:
    def handler(envelope: Envelope) -> None:
        raise exc

    return handler


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("2h", 7200), ("30d", 2592000), ("1h30m", 5400), ("0.5s", 0.5)],
)
def test_parse_duration_accepts_unit_forms(text: str, seconds: float) -> None:
    """Durations are numbers with s/m/h/d/w units, combinable."""
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "30", "3x", "1h30", "h", "-5m", "5 m", "1h 30m"])
def test_parse_duration_rejects_malformed_text(text: str) -> None:
    """Anything else is a ValueError that names the accepted forms."""
    with pytest.raises(ValueError, match="malformed duration"):
        parse_duration(text)


def test_parse_duration_rejects_durations_too_long_for_timedelta() -> None:
    """A number too large for a timedelta is a ValueError, not an OverflowError."""
    with pytest.raises(ValueError, match="too long"):
        parse_duration("9999999999999d")


def test_format_duration_is_short_and_human() -> None:
    """Ages print as 0s, 42s, 3m12s, 2h05m, 3d04h."""
    assert [format_duration(s) for s in (0, 42, 192, 7500, 273600)] == [
        "0s",
        "42s",
        "3m12s",
        "2h05m",
        "3d04h",
    ]


def test_database_url_uses_psycopg_for_postgresql_urls() -> None:
    """postgresql:// and postgres:// URLs are driven through psycopg 3."""
    for text in ("postgresql://u@h/d", "postgres://u@h/d", "postgresql+psycopg://u@h/d"):
        assert database_url(text).drivername == "postgresql+psycopg"


def test_database_url_rejects_other_databases() -> None:
    """A URL for another database or driver is refused with a reason."""
    with pytest.raises(ValueError, match="needs PostgreSQL"):
        database_url("mysql://u@h/d")


# --- errors common to every command -------------------------------------------------------


def test_no_database_configured_is_a_usage_error() -> None:
    """Without --database-url or DATABASE_URL a command exits 2 and says what to set."""
    result = run("status")
    assert_one_line_error(result, 2, "--database-url", "DATABASE_URL")


def test_database_url_comes_from_the_environment(db_url: sa.URL) -> None:
    """DATABASE_URL (postgresql:// form) is used when no flag is given."""
    url = url_text(db_url.set(drivername="postgresql"))
    result = run("status", "--json", env={"DATABASE_URL": url})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total"] == 0


def test_unreachable_database_exits_3_with_one_line() -> None:
    """A database nobody listens for gives exit 3 and one line, no traceback."""
    result = run("status", "--database-url", "postgresql://postgres:secret@127.0.0.1:1/nowhere")
    assert_one_line_error(result, 3, "cannot reach the database", "127.0.0.1:1")
    assert "secret" not in result.output


def test_unmigrated_database_exits_3_and_says_to_migrate(empty_db_url: sa.URL) -> None:
    """A database without the outbox tables gives exit 3 and points at `mailoutbox migrate`."""
    result = run(*db(empty_db_url, "status"))
    assert_one_line_error(result, 3, "mailoutbox migrate")


def test_malformed_schema_name_is_a_usage_error(db_url: sa.URL) -> None:
    """--schema must be a plain identifier."""
    result = run(*db(db_url, "status", "--schema", "Robert'); DROP"))
    assert_one_line_error(result, 2, "--schema")


def test_unknown_option_is_a_one_line_usage_error() -> None:
    """click's own usage errors follow the one-line rule too."""
    result = run("status", "--bogus")
    assert_one_line_error(result, 2, "--bogus", "mailoutbox status --help")


def test_no_command_prints_help_and_exits_2() -> None:
    """`mailoutbox` alone lists the commands."""
    result = run()
    assert result.exit_code == 2
    assert "worker" in result.stdout and "deliveries" in result.stdout


# --- migrate ------------------------------------------------------------------------------


def test_migrate_creates_the_tables_and_reports_the_revision(empty_db_url: sa.URL) -> None:
    """migrate upgrades an empty database to head; status works afterwards."""
    result = run(*db(empty_db_url, "migrate", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema"] == SCHEMA and report["revision"]
    assert run(*db(empty_db_url, "status")).exit_code == 0


def test_migrate_is_idempotent(db_url: sa.URL) -> None:
    """Migrating a migrated database changes nothing and succeeds."""
    result = run(*db(db_url, "migrate"))
    assert result.exit_code == 0, result.output
    assert "(head)" in result.stdout


def test_migrate_sql_prints_ddl_without_a_database() -> None:
    """--sql prints the DDL for the chosen schema and needs no database."""
    result = run("migrate", "--sql", "--schema", "billing_mail")
    assert result.exit_code == 0, result.output
    assert 'CREATE SCHEMA IF NOT EXISTS "billing_mail"' in result.stdout
    assert "CREATE TABLE billing_mail.mail_deliveries" in result.stdout


# --- status -------------------------------------------------------------------------------


def test_status_table_counts_every_state(db_url: sa.URL, outbox: Outbox) -> None:
    """status shows one row per state, the total, oldest due age and leases."""
    enqueued = outbox.enqueue_many([make_mail() for _ in range(3)])
    outbox.cancel(enqueued[0].delivery_id)
    result = run(*db(db_url, "status"))
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in _rows(result)}
    assert rows["pending"] == "2" and rows["cancelled"] == "1" and rows["sent"] == "0"
    assert set(rows) >= {s.value for s in Status}
    assert "oldest due delivery waiting:" in result.stdout
    assert "leases in flight: 0" in result.stdout


def test_status_json_reports_counts_age_and_leases(db_url: sa.URL, outbox: Outbox) -> None:
    """status --json gives every state, the total, oldest due age and leases."""
    outbox.enqueue_many([make_mail() for _ in range(2)])
    time.sleep(0.05)
    result = run(*db(db_url, "status", "--json"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["deliveries"] == {s.value: 2 if s is Status.PENDING else 0 for s in Status}
    assert report["total"] == 2 and report["leases_in_flight"] == 0
    assert report["oldest_due_age_seconds"] > 0


def _rows(result: Result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("│")]


# --- deliveries ---------------------------------------------------------------------------


def test_deliveries_list_shows_newest_first_with_paging(db_url: sa.URL, outbox: Outbox) -> None:
    """list pages newest first and says which rows of how many it shows."""
    ids = [outbox.enqueue(make_mail()).delivery_id for _ in range(3)]
    result = run(*db(db_url, "deliveries", "list", "--offset", "1", "--limit", "1"))
    assert result.exit_code == 0, result.output
    [row] = _rows(result)
    assert str(ids[1]) in row
    assert "showing 2-2 of 3" in result.stdout


def test_deliveries_list_filters_by_status_and_template(db_url: sa.URL, outbox: Outbox) -> None:
    """--status and --template narrow the listing."""
    first, second, third = outbox.enqueue_many(
        [make_mail(template_id="welcome"), make_mail(template_id="invoice"), make_mail()]
    )
    outbox.cancel(third.delivery_id)
    result = run(*db(db_url, "deliveries", "list", "--json", "--template", "welcome"))
    listed = json.loads(result.stdout)
    assert listed["total"] == 2
    assert {i["delivery_id"] for i in listed["items"]} == {
        str(first.delivery_id),
        str(third.delivery_id),
    }
    result = run(*db(db_url, "deliveries", "list", "--json", "--status", "cancelled"))
    assert [i["delivery_id"] for i in json.loads(result.stdout)["items"]] == [
        str(third.delivery_id)
    ]
    assert second.created


def test_deliveries_list_rejects_an_unknown_status(db_url: sa.URL) -> None:
    """--status takes only the states of the outbox."""
    result = run(*db(db_url, "deliveries", "list", "--status", "lost"))
    assert_one_line_error(result, 2, "--status")


def test_deliveries_list_json_has_the_delivery_fields(db_url: sa.URL, outbox: Outbox) -> None:
    """--json items carry the Delivery record's fields as plain JSON."""
    [enq] = outbox.enqueue_many([make_mail(template_id="welcome", idempotency_key="user-7")])
    result = run(*db(db_url, "deliveries", "list", "--json"))
    [item] = json.loads(result.stdout)["items"]
    assert item["delivery_id"] == str(enq.delivery_id)
    assert item["template_id"] == "welcome" and item["idempotency_key"] == "user-7"
    assert item["status"] == "pending" and item["attempts"] == 0
    assert item["created_at"].startswith("20")


def test_deliveries_show_lists_recipients_and_every_attempt(db_url: sa.URL, outbox: Outbox) -> None:
    """show prints the delivery, its recipients and each attempt with its SMTP code."""
    enq = outbox.enqueue(make_mail(to=["ann@example.com"], cc=["bob@example.com"]))
    failures = [TransientSendError(451, "4.7.1 try later", enhanced_code="4.7.1")]

    def flaky(envelope: Envelope) -> None:
        if failures:
            raise failures.pop()

    tick(outbox, flaky)
    tick(outbox, flaky)
    result = run(*db(db_url, "deliveries", "show", str(enq.delivery_id)))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "ann@example.com" in out and "bob@example.com" in out
    assert "transient_failure" in out and "451 4.7.1" in out
    assert "sent" in out and "Welcome" in out


def test_deliveries_show_names_the_recipients_a_sent_attempt_was_refused_for(
    db_url: sa.URL, outbox: Outbox
) -> None:
    """A mail sent with one recipient refused is `sent`: only the attempt says who did not
    get it, and the table used to leave that to --json."""
    enq = outbox.enqueue(make_mail(to=["ann@example.com"], cc=["gone@example.com"]))
    refused = {"gone@example.com": (550, "5.1.1 no such user")}
    tick(outbox, lambda envelope: SendResult(refused=refused))
    result = run(*db(db_url, "deliveries", "show", str(enq.delivery_id)))
    assert result.exit_code == 0, result.output
    assert "refused 1: gone@example.com 550 5.1.1 no such user" in " ".join(result.stdout.split())


def test_deliveries_show_marks_the_recipients_a_retried_mail_has_settled(
    db_url: sa.URL, outbox: Outbox
) -> None:
    """A mail retried for one greylisted recipient: show says who has it already."""
    enq = outbox.enqueue(make_mail(to=["Ann <ann@example.com>"], cc=["grey@example.com"]))
    refused = {"grey@example.com": (451, "4.7.1 greylisted")}
    tick(outbox, lambda envelope: SendResult(refused=refused))
    result = run(*db(db_url, "deliveries", "show", str(enq.delivery_id)))
    assert result.exit_code == 0, result.output
    [ann] = [line for line in result.stdout.splitlines() if "ann@example.com" in line]
    [grey] = [line for line in result.stdout.splitlines() if "│ grey@example.com" in line]
    assert "settled earlier" in result.stdout and "yes" in ann and "yes" not in grey
    shown = json.loads(
        run(*db(db_url, "deliveries", "show", "--json", str(enq.delivery_id))).stdout
    )
    assert shown["delivery"]["status"] == "retrying"
    assert shown["delivery"]["settled_recipients"] == ["ann@example.com"]


def test_deliveries_show_json_has_delivery_recipients_and_attempts(
    db_url: sa.URL, outbox: Outbox
) -> None:
    """show --json gives the delivery, its recipients and attempts."""
    enq = outbox.enqueue(make_mail(to=["ann@example.com"]))
    tick(outbox, fail_with(PermanentSendError(550, "5.1.1 no such user", enhanced_code="5.1.1")))
    result = run(*db(db_url, "deliveries", "show", "--json", str(enq.delivery_id)))
    shown = json.loads(result.stdout)
    assert shown["delivery"]["status"] == "dead_lettered"
    assert shown["recipients"] == [{"address": "ann@example.com", "kind": "to"}]
    [attempt] = shown["attempts"]
    assert attempt["outcome"] == "permanent_failure" and attempt["smtp_code"] == 550
    assert attempt["smtp_enhanced_code"] == "5.1.1"


def test_deliveries_show_unknown_id_exits_1(db_url: sa.URL) -> None:
    """An id that names no delivery gives exit 1 and one line."""
    result = run(*db(db_url, "deliveries", "show", "4b0c0b38-1111-4111-8111-111111111111"))
    assert_one_line_error(result, 1, "no delivery with id 4b0c0b38-1111")


def test_deliveries_show_malformed_id_exits_1(db_url: sa.URL) -> None:
    """Text that is no UUID names no delivery either."""
    result = run(*db(db_url, "deliveries", "show", "not-an-id"))
    assert_one_line_error(result, 1, "no delivery with id not-an-id")


# --- dead letters, resend, cancel, purge --------------------------------------------------


def test_dead_letters_lists_the_reason(db_url: sa.URL, outbox: Outbox) -> None:
    """dead-letters shows each dead-lettered delivery with its reason."""
    enq = outbox.enqueue(make_mail())
    tick(outbox, fail_with(PermanentSendError(550, "5.1.1 no such user")))
    result = run(*db(db_url, "dead-letters"))
    assert result.exit_code == 0, result.output
    [row] = _rows(result)
    assert str(enq.delivery_id) in row and "permanent failure" in row
    assert "showing 1-1 of 1" in result.stdout


def test_dead_letters_json_pages(db_url: sa.URL, outbox: Outbox) -> None:
    """dead-letters --json gives total and the page's items."""
    outbox.enqueue_many([make_mail() for _ in range(2)])
    tick(outbox, fail_with(PermanentSendError(550, "no")))
    result = run(*db(db_url, "dead-letters", "--json", "--limit", "1"))
    page = json.loads(result.stdout)
    assert page["total"] == 2 and len(page["items"]) == 1
    assert page["items"][0]["reason"].startswith("permanent failure")


def test_resend_rearms_dead_letters(db_url: sa.URL, outbox: Outbox) -> None:
    """resend puts dead-lettered deliveries back to pending and says so per id."""
    ids = [e.delivery_id for e in outbox.enqueue_many([make_mail() for _ in range(2)])]
    tick(outbox, fail_with(PermanentSendError(550, "no")))
    result = run(*db(db_url, "resend", *map(str, ids)))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"resent {i}: now pending" for i in ids]
    assert all(outbox.get_delivery(i).status is Status.PENDING for i in ids)


def test_resend_of_a_sent_delivery_exits_1_and_goes_on(db_url: sa.URL, outbox: Outbox) -> None:
    """A sent id fails with a one-line reason; the other ids are still resent."""
    sent = outbox.enqueue(make_mail())
    tick(outbox)
    dead = outbox.enqueue(make_mail())
    tick(outbox, fail_with(PermanentSendError(550, "no")))
    result = run(*db(db_url, "resend", "--json", str(sent.delivery_id), str(dead.delivery_id)))
    assert result.exit_code == 1
    assert json.loads(result.stdout) == [
        {
            "delivery_id": str(sent.delivery_id),
            "ok": False,
            "error": f"cannot resend delivery {sent.delivery_id}: it is sent",
        },
        {"delivery_id": str(dead.delivery_id), "ok": True, "status": "pending"},
    ]


def test_a_statement_that_times_out_fails_its_id_alone_and_the_report_is_whole(
    db_url: sa.URL, outbox: Outbox
) -> None:
    """One id whose row another transaction holds (statement timeout) is reported failed,
    exit 1: the database answered, so not 'cannot reach the database' (exit 3). The ids
    after it are still resent, and --json reports every id, those already changed too."""
    a, b, c = (e.delivery_id for e in outbox.enqueue_many([make_mail() for _ in range(3)]))
    url = db_url.update_query_dict({"options": "-c statement_timeout=300"})
    with outbox.engine.connect() as holder:
        holder.execute(
            sa.text(f"SELECT 1 FROM {SCHEMA}.mail_deliveries WHERE delivery_id = :id FOR UPDATE"),
            {"id": b},
        )
        result = run("resend", "--json", str(a), str(b), str(c), "--database-url", url_text(url))
        holder.rollback()
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert [r["delivery_id"] for r in report] == [str(a), str(b), str(c)]
    assert [r["ok"] for r in report] == [True, False, True]
    assert "statement timeout" in report[1]["error"]


def test_paging_and_purge_bounds_are_usage_errors(db_url: sa.URL) -> None:
    """Numbers past what the database can take are refused as usage (exit 2), not
    passed on to fail there as 'bigint out of range' (exit 1)."""
    result = run(*db(db_url, "deliveries", "list", "--offset", str(2**63)))
    assert_one_line_error(result, 2, "--offset")
    result = run(*db(db_url, "purge", "--older-than", "520000w"))
    assert_one_line_error(result, 2, "--older-than", "36500 days")


def test_resend_unknown_id_exits_1(db_url: sa.URL) -> None:
    """resend of an id that names no delivery gives exit 1 and one line."""
    result = run(*db(db_url, "resend", "4b0c0b38-1111-4111-8111-111111111111"))
    assert_one_line_error(result, 1, "no delivery with id")


def test_cancel_stops_pending_deliveries(db_url: sa.URL, outbox: Outbox) -> None:
    """cancel turns pending deliveries into cancelled ones."""
    enq = outbox.enqueue(make_mail())
    result = run(*db(db_url, "cancel", str(enq.delivery_id)))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"cancelled {enq.delivery_id}: now cancelled"
    assert outbox.get_delivery(enq.delivery_id).status is Status.CANCELLED


def test_cancel_of_a_sent_delivery_exits_1(db_url: sa.URL, outbox: Outbox) -> None:
    """A finished delivery cannot be cancelled: exit 1, one line."""
    enq = outbox.enqueue(make_mail())
    tick(outbox)
    result = run(*db(db_url, "cancel", str(enq.delivery_id)))
    assert_one_line_error(result, 1, "cannot cancel", "it is sent")


def test_cancel_needs_at_least_one_id(db_url: sa.URL) -> None:
    """cancel without ids is a usage error."""
    assert run(*db(db_url, "cancel")).exit_code == 2


def test_purge_deletes_finished_deliveries(db_url: sa.URL, outbox: Outbox) -> None:
    """purge --older-than 0s deletes sent ones and keeps pending ones."""
    outbox.enqueue_many([make_mail() for _ in range(2)])
    tick(outbox)
    pending = outbox.enqueue(make_mail())
    result = run(*db(db_url, "purge", "--older-than", "0s", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"purged": 2, "older_than_seconds": 0.0}
    assert outbox.count_by_status()[Status.PENDING] == 1
    assert outbox.get_delivery(pending.delivery_id).status is Status.PENDING


def test_purge_keeps_recent_deliveries(db_url: sa.URL, outbox: Outbox) -> None:
    """Deliveries younger than --older-than stay."""
    outbox.enqueue(make_mail())
    tick(outbox)
    result = run(*db(db_url, "purge", "--older-than", "30d"))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "purged 0 deliveries older than 30d00h"
    assert outbox.count_by_status()[Status.SENT] == 1


def test_purge_malformed_duration_exits_2_with_one_line(db_url: sa.URL) -> None:
    """A malformed --older-than is a usage error that shows the accepted forms."""
    result = run(*db(db_url, "purge", "--older-than", "30 days"))
    assert_one_line_error(result, 2, "--older-than", "malformed duration", "1h30m")


def test_purge_requires_older_than(db_url: sa.URL) -> None:
    """purge never guesses an age: --older-than is required."""
    result = run(*db(db_url, "purge"))
    assert_one_line_error(result, 2, "--older-than")


# --- worker: configuration errors (in-process; they exit before delivering) ---------------


def test_worker_has_no_password_flag(db_url: sa.URL) -> None:
    """A password flag would show in `ps`: there is none."""
    result = run(*db(db_url, "worker", "--smtp-host", "h", "--smtp-password", "x"))
    assert_one_line_error(result, 2, "--smtp-password")


def test_worker_username_without_password_is_a_usage_error(db_url: sa.URL) -> None:
    """--smtp-username needs MAILOUTBOX_SMTP_PASSWORD or --smtp-password-file."""
    result = run(*db(db_url, "worker", "--smtp-host", "h", "--smtp-username", "u"))
    assert_one_line_error(result, 2, "MAILOUTBOX_SMTP_PASSWORD")


def test_worker_password_given_twice_is_a_usage_error(db_url: sa.URL, tmp_path: Path) -> None:
    """The password comes from the environment or a file, not both."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    args = ("worker", "--smtp-host", "h", "--smtp-username", "u", "--smtp-password-file")
    result = run(*db(db_url, *args, str(secret)), env={"MAILOUTBOX_SMTP_PASSWORD": "other"})
    assert_one_line_error(result, 2, "not both")
    assert "s3cret" not in result.output


def test_worker_malformed_lease_exits_2(db_url: sa.URL) -> None:
    """Worker durations are parsed like every other duration."""
    result = run(*db(db_url, "worker", "--smtp-host", "h", "--lease", "5 minutes"))
    assert_one_line_error(result, 2, "--lease", "malformed duration")


def test_worker_zero_poll_interval_exits_2(db_url: sa.URL) -> None:
    """Intervals must be positive."""
    result = run(*db(db_url, "worker", "--smtp-host", "h", "--poll-interval", "0s"))
    assert_one_line_error(result, 2, "--poll-interval")


def test_worker_metrics_ports_past_65535_are_a_usage_error(db_url: sa.URL) -> None:
    """Process i serves on PORT+i-1: the last one past 65535 crashed and was restarted
    for ever, its slot never running."""
    args = ("worker", "--smtp-host", "h", "--processes", "2", "--metrics-port", "65535")
    result = run(*db(db_url, *args))
    assert_one_line_error(result, 2, "--metrics-port 65535", "65536 is past 65535")


def test_worker_malformed_message_id_domain_exits_2(db_url: sa.URL) -> None:
    """A domain no Message-ID may carry is a usage error, not a worker that dead-letters
    every mail it renders."""
    result = run(*db(db_url, "worker", "--smtp-host", "h", "--message-id-domain", "a..b"))
    assert_one_line_error(result, 2, "Message-ID domain")


def test_worker_smtp_settings_come_from_the_environment(empty_db_url: sa.URL) -> None:
    """MAILOUTBOX_SMTP_* fill the SMTP flags (here: an invalid security value is caught)."""
    env = {"MAILOUTBOX_SMTP_HOST": "relay.example", "MAILOUTBOX_SMTP_SECURITY": "ssl"}
    result = run(*db(empty_db_url, "worker"), env=env)
    assert_one_line_error(result, 2, "--smtp-security", "ssl")


def test_worker_on_unmigrated_database_exits_3(empty_db_url: sa.URL) -> None:
    """The worker checks the schema before it starts and exits 3 if it is missing."""
    result = run(*db(empty_db_url, "worker", "--smtp-host", "127.0.0.1"))
    assert_one_line_error(result, 3, "mailoutbox migrate")


@pytest.mark.parametrize("processes", ["1", "2"])
def test_worker_on_a_schema_a_migration_behind_exits_3(db_url: sa.URL, processes: str) -> None:
    """Upgrading the package without `mailoutbox migrate` is caught before anything is
    claimed; before, every claim failed on the missing column and the worker retried
    for ever, logging 'database unavailable', while no mail went out."""
    engine = sa.create_engine(db_url)
    try:
        mailoutbox.downgrade(engine, schema=SCHEMA, revision="0003")
    finally:
        engine.dispose()
    args = ("worker", "--smtp-host", "127.0.0.1", "--processes", processes)
    result = run(*db(db_url, *args))
    assert_one_line_error(result, 3, "at migration 0003", "needs 0005", "mailoutbox migrate")


def test_a_schema_migrated_by_a_newer_release_passes_the_worker_check(db_url: sa.URL) -> None:
    """In a rolling deploy a newer release migrates first while older workers still run:
    migrations only add, so an unknown, newer revision is not refused."""
    from mailoutbox.migrations import require_current

    engine = sa.create_engine(db_url)
    try:
        with engine.begin() as conn:
            require_current(conn, SCHEMA)
            conn.execute(
                sa.text(f"UPDATE {SCHEMA}.mailoutbox_alembic_version SET version_num = '0099'")
            )
            require_current(conn, SCHEMA)
            conn.execute(
                sa.text(f"UPDATE {SCHEMA}.mailoutbox_alembic_version SET version_num = '0002'")
            )
            with pytest.raises(mailoutbox.SchemaNotMigrated, match="at migration 0002"):
                require_current(conn, SCHEMA)
    finally:
        engine.dispose()


def test_worker_on_unreachable_database_exits_3() -> None:
    """The worker does not start against a database it cannot reach."""
    result = run(
        "worker",
        "--smtp-host",
        "127.0.0.1",
        "--database-url",
        "postgresql://postgres@127.0.0.1:1/x",
    )
    assert_one_line_error(result, 3, "cannot reach the database")


def test_worker_metrics_port_without_prometheus_client_is_a_clear_error(
    db_url: sa.URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--metrics-port without the metrics extra names the extra to install."""
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "mailoutbox.metrics", raising=False)
    monkeypatch.delattr(mailoutbox, "metrics", raising=False)
    result = run(*db(db_url, "worker", "--smtp-host", "h", "--metrics-port", "0"))
    assert_one_line_error(result, 2, "mailoutbox[metrics]")


# --- worker: a real run in a subprocess ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def worker_process(
    db_url: sa.URL,
    sink: SmtpSink,
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    own_group: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """`mailoutbox worker` against `sink`; SIGTERM on exit. Logs go to tmp_path/worker.log.

    `own_group`: in a process group of its own, as a terminal's foreground job is
    (so that a test can signal the group as Ctrl-C does).
    """
    environment = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    environment.update(env or {})
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), environment.get("PYTHONPATH", "")) if p
    )
    environment["DATABASE_URL"] = url_text(db_url)
    command = [
        sys.executable,
        "-m",
        "mailoutbox.cli",
        "worker",
        "--smtp-host",
        sink.host,
        "--smtp-port",
        str(sink.port),
        "--smtp-security",
        "none",
        "--poll-interval",
        "0.2s",
        *args,
    ]
    with (tmp_path / "worker.log").open("wb") as log_file:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=environment,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=own_group,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise


def wait_for(outbox: Outbox, status: Status, count: int, timeout: float = 20.0) -> None:
    wait_until(
        lambda: outbox.count_by_status()[status] >= count, timeout, f"{count} {status} deliveries"
    )


def test_worker_delivers_and_exits_0_on_sigterm(
    db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """The worker sends what is enqueued to the SMTP server and stops cleanly on SIGTERM."""
    with SmtpSink() as sink, worker_process(db_url, sink, tmp_path) as process:
        outbox.enqueue_many([make_mail(to=[f"u{i}@example.com"]) for i in range(5)])
        wait_for(outbox, Status.SENT, 5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert len(sink.messages) == 5
    logs = (tmp_path / "worker.log").read_text()
    assert "starting" in logs and "stopped" in logs
    assert "Traceback" not in logs


def test_worker_logs_no_recipient_address_at_info(
    db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """Addresses the server quotes in a refusal are masked in INFO logs."""
    with SmtpSink() as sink, worker_process(db_url, sink, tmp_path):
        sink.rcpt_replies = {"gone@example.com": "550 5.1.1 <gone@example.com>: no such user"}
        outbox.enqueue(make_mail(to=["gone@example.com"]))
        wait_for(outbox, Status.DEAD_LETTERED, 1)
    logs = (tmp_path / "worker.log").read_text()
    assert "permanent_failure" in logs and "<***@example.com>" in logs
    assert "gone@example.com" not in logs


def test_worker_logs_structured_json(db_url: sa.URL, outbox: Outbox, tmp_path: Path) -> None:
    """--log-format json prints one object per line with the context fields."""
    with SmtpSink() as sink, worker_process(db_url, sink, tmp_path, "--log-format", "json"):
        sink.rcpt_replies = {"busy@example.com": "451 4.2.1 mailbox busy"}
        outbox.enqueue(make_mail(to=["busy@example.com"]))
        wait_for(outbox, Status.RETRYING, 1)
    records = [json.loads(line) for line in (tmp_path / "worker.log").read_text().splitlines()]
    [failure] = [r for r in records if r.get("outcome") == "transient_failure"]
    assert failure["level"] == "info" and failure["logger"].startswith("mailoutbox.")
    assert failure["smtp_code"] == 451 and failure["attempt"] == 1
    assert failure["delivery_id"]


def test_worker_logs_in_with_the_password_from_the_environment(
    db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """MAILOUTBOX_SMTP_PASSWORD authenticates the worker and is never logged."""
    env = {"MAILOUTBOX_SMTP_PASSWORD": "s3cret-pw", "MAILOUTBOX_SMTP_USERNAME": "mailer"}
    with (
        SmtpSink(credentials=("mailer", "s3cret-pw"), auth_required=True) as sink,
        worker_process(db_url, sink, tmp_path, "--log-level", "debug", env=env),
    ):
        outbox.enqueue(make_mail())
        wait_for(outbox, Status.SENT, 1)
        assert sink.messages[0].authenticated_as == "mailer"
    assert "s3cret-pw" not in (tmp_path / "worker.log").read_text()


def test_worker_reads_the_password_from_a_file(
    db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """--smtp-password-file is the other way to give the password."""
    secret = tmp_path / "smtp-password"
    secret.write_text("from-a-file\n")
    args = ("--smtp-username", "mailer", "--smtp-password-file", str(secret))
    with (
        SmtpSink(credentials=("mailer", "from-a-file"), auth_required=True) as sink,
        worker_process(db_url, sink, tmp_path, *args),
    ):
        outbox.enqueue(make_mail())
        wait_for(outbox, Status.SENT, 1)
        assert sink.messages[0].authenticated_as == "mailer"


def test_worker_serves_metrics(db_url: sa.URL, outbox: Outbox, tmp_path: Path) -> None:
    """--metrics-port serves Prometheus metrics about the deliveries it made."""
    port = _free_port()
    with (
        SmtpSink() as sink,
        worker_process(
            db_url, sink, tmp_path, "--metrics-port", str(port), "--metrics-host", "127.0.0.1"
        ),
    ):
        outbox.enqueue_many([make_mail() for _ in range(3)])
        wait_for(outbox, Status.SENT, 3)
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    text = r.read().decode()
            except OSError:
                text = ""
            if 'mailoutbox_attempts_total{outcome="sent"} 3.0' in text:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
    assert 'mailoutbox_deliveries{status="sent"}' in text


# --- worker --processes: a supervisor and its children --------------------------------------


def _children(process: subprocess.Popen[bytes], count: int, timeout: float = 30.0) -> list[int]:
    """The pids of `process`'s `count` worker children, once that many are running."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [
            child.pid
            for child in psutil.Process(process.pid).children()
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline())
        ]
        if len(pids) == count:
            return sorted(pids)
        assert process.poll() is None, "the supervisor exited"
        assert time.monotonic() < deadline, f"{len(pids)} worker processes, expected {count}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_for_log(log: Path, *texts: str, timeout: float = 30.0) -> None:
    """Until every one of `texts` is in the worker log: a spawned child takes a while to start."""
    wait_until(lambda: all(text in log.read_text() for text in texts), timeout, f"{texts} logged")


def _worker_names(outbox: Outbox) -> set[str]:
    with outbox.engine.connect() as conn:
        rows = conn.execute(sa.text(f"SELECT DISTINCT worker FROM {SCHEMA}.mail_attempts"))
        return {row[0] for row in rows}


def test_worker_processes_share_the_outbox_and_stop_together(
    db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """--processes 2 runs two named workers; SIGTERM stops both and the supervisor exits 0."""
    args = ("--processes", "2", "--name", "node-a", "--batch-size", "5")
    with SmtpSink() as sink, worker_process(db_url, sink, tmp_path, *args) as process:
        children = _children(process, 2)
        # Both started before any mail: one child alone can send all 60 and be stopped
        # before its sibling has finished importing, and then the sibling never logs.
        _wait_for_log(
            tmp_path / "worker.log", "worker node-a-1 starting", "worker node-a-2 starting"
        )
        outbox.enqueue_many([make_mail(to=[f"u{i}@example.com"]) for i in range(60)])
        wait_for(outbox, Status.SENT, 60)
        assert _worker_names(outbox) <= {"node-a-1", "node-a-2"}
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert not any(_alive(pid) for pid in children)
        assert len(sink.messages) == 60
    logs = (tmp_path / "worker.log").read_text()
    assert "worker node-a-1 starting" in logs and "worker node-a-2 starting" in logs
    assert "Traceback" not in logs


def test_ctrl_c_while_the_worker_processes_start_stops_them_without_tracebacks(
    db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """Ctrl-C signals the whole foreground group, children still importing included.

    They used to die of it with a KeyboardInterrupt traceback each. The supervisor's
    SIGTERM is what stops them, so they end quietly and the supervisor exits 0.
    """
    with (
        SmtpSink() as sink,
        worker_process(db_url, sink, tmp_path, "--processes", "2", own_group=True) as process,
    ):
        children = _children(process, 2)  # spawned, and still importing
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert not any(_alive(pid) for pid in children)
    logs = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in logs and "KeyboardInterrupt" not in logs, logs
    assert "stopping the worker processes" in logs


def test_a_worker_process_that_dies_is_started_again(
    db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """A child killed with SIGKILL is replaced, and mail enqueued afterwards is still sent."""
    with SmtpSink() as sink, worker_process(db_url, sink, tmp_path, "--processes", "2") as process:
        first, second = _children(process, 2)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            now = _children(process, 2)
            if first not in now:
                break
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            time.sleep(0.1)
        assert second in now
        os.kill(second, signal.SIGKILL)  # both replaced: the new ones do the sending
        outbox.enqueue_many([make_mail(to=[f"u{i}@example.com"]) for i in range(10)])
        wait_for(outbox, Status.SENT, 10, timeout=40)
        assert len(sink.messages) == 10
    logs = (tmp_path / "worker.log").read_text()
    assert "exited with signal SIGKILL; starting it again" in logs


def test_worker_processes_stop_when_their_supervisor_is_killed(
    db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """No orphan keeps sending: children of a SIGKILLed supervisor stop by themselves."""
    with SmtpSink() as sink, worker_process(db_url, sink, tmp_path, "--processes", "2") as process:
        children = _children(process, 2)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in children):
            assert time.monotonic() < deadline, "worker processes outlived their supervisor"
            time.sleep(0.1)
    assert "is gone: stopping" in (tmp_path / "worker.log").read_text()


def test_worker_processes_zero_is_a_usage_error(db_url: sa.URL) -> None:
    result = run(*db(db_url, "worker", "--smtp-host", "h", "--processes", "0"))
    assert_one_line_error(result, 2, "--processes")


def test_worker_processes_on_unmigrated_database_exits_3(empty_db_url: sa.URL) -> None:
    """The supervisor checks the database before it starts any child."""
    result = run(*db(empty_db_url, "worker", "--smtp-host", "h", "--processes", "2"))
    assert_one_line_error(result, 3, "migrate")


# --- logging set-up -----------------------------------------------------------------------


def test_redact_addresses_keeps_the_domain() -> None:
    """Addresses lose their local part, keep their domain."""
    assert redact_addresses("550 <bob.smith+x@mail.example.com> unknown") == (
        "550 <***@mail.example.com> unknown"
    )


def test_text_logs_show_context_and_mask_addresses_at_info() -> None:
    """The text format appends `extra` as key=value; INFO masks addresses, DEBUG keeps them."""
    stream = io.StringIO()
    setup = configure_logging("debug", stream=stream)
    try:
        log = logging.getLogger("mailoutbox.test")
        log.info("refused %s", "ann@example.com", extra={"delivery_id": "d1", "smtp_code": 550})
        log.debug("to %s", "ann@example.com")
    finally:
        setup.restore()
    info, debug = stream.getvalue().splitlines()
    assert info.endswith(
        "INFO mailoutbox.test: refused ***@example.com delivery_id=d1 smtp_code=550"
    )
    assert debug.endswith("DEBUG mailoutbox.test: to ann@example.com")


def test_a_record_is_one_line_whatever_its_message_holds() -> None:
    """A line break in a message (a server's reply, a transport's error) is escaped, so a
    line-oriented log shipper sees one record; a traceback still follows on its lines."""
    stream = io.StringIO()
    setup = configure_logging("info", stream=stream)
    try:
        log = logging.getLogger("mailoutbox.test")
        log.warning("451 rate limited\r\nretry later")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        setup.restore()
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("WARNING mailoutbox.test: 451 rate limited\\r\\nretry later")
    assert lines[1].endswith("ERROR mailoutbox.test: failed")
    assert lines[2] == "Traceback (most recent call last):"


def test_a_malformed_log_call_does_not_raise_where_it_was_made(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The address filter formats the message first; with the wrong % arguments it raised
    at the call site (inside a transport's send, the mail was dead-lettered). Nor is it
    left to logging's own error report, which prints the arguments unmasked."""
    root = logging.getLogger()
    stream = io.StringIO()
    setup = configure_logging("info", stream=stream)
    # pytest's own capture handler fails a test on a malformed record: out of the way.
    others = [h for h in root.handlers if h.get_name() != setup.handler.get_name()]
    for handler in others:
        root.removeHandler(handler)
    try:
        logging.getLogger("mailoutbox.test").warning("to %s via %s", "bob.secret@example.com")
    finally:
        for handler in others:
            root.addHandler(handler)
        setup.restore()
    [line] = stream.getvalue().splitlines()
    assert line.endswith(
        "WARNING mailoutbox.test: malformed log call: to %s via %s with arguments: ***@example.com"
    )
    assert "bob.secret" not in capsys.readouterr().err


def test_configure_logging_keeps_sqlalchemy_quiet() -> None:
    """Other libraries log at WARNING only (SQLAlchemy at INFO would print parameters)."""
    setup = configure_logging("debug", stream=io.StringIO())
    try:
        assert not logging.getLogger("sqlalchemy.engine").isEnabledFor(logging.INFO)
        assert logging.getLogger("mailoutbox.worker").isEnabledFor(logging.DEBUG)
    finally:
        setup.restore()
