"""`mailoutbox demo`: on the embedded PostgreSQL in a subprocess, and on a given database."""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from mailoutbox.cli import cli
from mailoutbox.demo import plan_mails
from mailoutbox.devsink import DevSink
from mailoutbox.schema import Status

REPO = Path(__file__).resolve().parent.parent


def demo_servers(tmpdir: Path) -> dict[int, str]:
    """pid -> command line of live postgres processes whose command line or cwd is in tmpdir.

    The postmaster names its data directory in its command line, and every
    postgres process works in the data directory, so this finds the demo's
    server and its children, and not other servers' (the machine may run a
    system PostgreSQL and other test sessions' embedded servers meanwhile).
    """
    found: dict[int, str] = {}
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        if proc.info["name"] != "postgres" or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        command = " ".join(proc.info["cmdline"] or ())
        try:
            cwd = proc.cwd()
        except psutil.Error:
            cwd = ""
        if str(tmpdir) in command or cwd.startswith(str(tmpdir)):
            found[proc.pid] = command
    return found


def state_counts(output: str) -> dict[str, int]:
    """The 'Deliveries per state' table of the demo's output."""
    rows = re.findall(r"^│ (\w+)\s+│\s+(\d+) │$", output, re.MULTILINE)
    return {state: int(count) for state, count in rows}


def run_cli(*args: str) -> Result:
    env = {"DATABASE_URL": None, "MAILOUTBOX_SCHEMA": None, "COLUMNS": "120"}
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def demo_tmpdir() -> Iterator[Path]:
    """A TMPDIR for the demo subprocess, reachable by the server's system user as root."""
    path = Path(tempfile.mkdtemp(prefix="mailoutbox-demo-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_demo_on_embedded_postgres_delivers_everything_and_leaves_nothing_behind(
    demo_tmpdir: Path,
) -> None:
    """With no database configured the demo passes its checks in time and stops its server."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "MAILOUTBOX_TEST_DATABASE_URL", "MAILOUTBOX_SCHEMA")
    }
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(demo_tmpdir), COLUMNS="120")
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mailoutbox.cli", "demo"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 60
    assert "every delivery ended in the expected state" in result.stdout
    counts = state_counts(result.stdout)
    assert counts == {
        "pending": 0,
        "sending": 0,
        "retrying": 0,
        "sent": 1950,
        "dead_lettered": 40,
        "cancelled": 0,
    }
    assert "deliveries/s" in result.stdout
    assert "transient_failure" in result.stdout and "permanent_failure" in result.stdout
    assert result.stderr == ""
    assert demo_servers(demo_tmpdir) == {}
    # (embedded-postgres keeps its lock file in runtime-0 when XDG_RUNTIME_DIR is unset)
    assert list(demo_tmpdir.glob("mailoutbox-demo-pg-*")) == []


@pytest.mark.parametrize(
    ("after", "signals"),
    [
        ("Starting an embedded PostgreSQL", (signal.SIGINT,)),
        ("SMTP sink", (signal.SIGINT, signal.SIGINT)),
        ("SMTP sink", (signal.SIGTERM,)),
        ("SMTP sink", (signal.SIGTERM, signal.SIGTERM)),
    ],
    ids=["ctrl-c-while-the-server-starts", "ctrl-c-twice", "sigterm", "sigterm-twice"],
)
def test_an_interrupted_demo_leaves_no_server_and_no_directory(
    demo_tmpdir: Path, after: str, signals: tuple[signal.Signals, ...]
) -> None:
    """Ctrl-C (to the whole group, as a terminal sends it) while initdb or pg_ctl runs, a
    second Ctrl-C during the clean-up, or a SIGTERM: each used to leave a running server
    or its data directory behind."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "MAILOUTBOX_TEST_DATABASE_URL", "MAILOUTBOX_SCHEMA")
    }
    env.update(PYTHONPATH=str(REPO), TMPDIR=str(demo_tmpdir), PYTHONUNBUFFERED="1")
    with subprocess.Popen(
        [sys.executable, "-m", "mailoutbox.cli", "demo", "--count", "20000"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        # A runner started in the background without job control (`cmd &` in a script)
        # ignores SIGINT, and an ignored SIGINT is inherited: Python then installs no
        # KeyboardInterrupt handler, and the demo would never see the Ctrl-C sent here.
        preexec_fn=_sigint_default,
    ) as process:
        _interrupt(process, after, signals)
    assert demo_servers(demo_tmpdir) == {}
    assert list(demo_tmpdir.glob("mailoutbox-demo-pg-*")) == []


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(
    process: subprocess.Popen[str], after: str, signals: tuple[signal.Signals, ...]
) -> None:
    """Signal the demo's process group once `after` is printed; check it ends with 130."""
    try:
        assert process.stdout is not None
        output = ""
        while after not in output:
            line = process.stdout.readline()
            assert line, f"the demo ended before {after!r}: {output}"
            output += line
        time.sleep(0.3)
        for number in signals:
            os.killpg(process.pid, number)
            time.sleep(0.15)
        assert process.wait(timeout=60) == 130, output + process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_demo_on_a_given_database_drops_its_schema(empty_db_url: sa.URL) -> None:
    """With --database-url the demo works in schema mailoutbox_demo and drops it afterwards."""
    url = empty_db_url.render_as_string(hide_password=False)
    result = run_cli("demo", "--database-url", url, "--count", "300")
    assert result.exit_code == 0, result.output
    assert state_counts(result.stdout)["sent"] + state_counts(result.stdout)["dead_lettered"] == (
        len({(p.template_id, p.idempotency_key) for p in plan_mails(300)})
    )
    engine = sa.create_engine(empty_db_url, poolclass=sa.pool.NullPool)
    try:
        assert "mailoutbox_demo" not in sa.inspect(engine).get_schema_names()
    finally:
        engine.dispose()


def test_demo_keep_schema_leaves_the_deliveries_to_inspect(empty_db_url: sa.URL) -> None:
    """--keep-schema keeps the demo's schema, whose status the CLI can then show."""
    url = empty_db_url.render_as_string(hide_password=False)
    result = run_cli("demo", "--database-url", url, "--count", "50", "--keep-schema")
    assert result.exit_code == 0, result.output
    status = run_cli("status", "--json", "--database-url", url, "--schema", "mailoutbox_demo")
    assert status.exit_code == 0, status.output
    assert '"sent": 48' in status.stdout


def test_demo_refuses_a_schema_that_exists(db_url: sa.URL) -> None:
    """The demo never works in (nor drops) a schema it did not create."""
    url = db_url.render_as_string(hide_password=False)
    result = run_cli("demo", "--database-url", url, "--schema", "mailoutbox", "--count", "10")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: schema 'mailoutbox' exists already")
    engine = sa.create_engine(db_url, poolclass=sa.pool.NullPool)
    try:
        assert "mail_deliveries" in sa.inspect(engine).get_table_names(schema="mailoutbox")
    finally:
        engine.dispose()


def test_two_demos_never_share_a_schema(empty_db_url: sa.URL) -> None:
    """The schema is claimed by creating it: a look before creating let two demos take
    the same one, and the first to finish dropped it under the other."""
    from mailoutbox.demo import DemoError, _claim_schema

    engine = sa.create_engine(empty_db_url, pool_size=2)
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def claim() -> None:
        start.wait(10)
        try:
            _claim_schema(engine, "mailoutbox_demo")
            outcomes.append("claimed")
        except DemoError:
            outcomes.append("refused")

    try:
        for _ in range(5):
            with engine.begin() as conn:
                conn.execute(sa.text("DROP SCHEMA IF EXISTS mailoutbox_demo"))
            threads = [threading.Thread(target=claim) for _ in range(2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
        assert Counter(outcomes) == {"claimed": 5, "refused": 5}
    finally:
        engine.dispose()


def test_demo_without_its_smtp_sink_says_what_to_install_before_touching_the_database(
    empty_db_url: sa.URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain install (no `demo` extra) given a database URL printed a traceback."""
    monkeypatch.setitem(sys.modules, "aiosmtpd", None)
    url = empty_db_url.render_as_string(hide_password=False)
    result = run_cli("demo", "--database-url", url, "--count", "10")
    assert result.exit_code == 1
    assert result.stderr == (
        'error: the demo\'s SMTP sink needs aiosmtpd: pip install "mailoutbox[demo]"\n'
    )
    engine = sa.create_engine(empty_db_url, poolclass=sa.pool.NullPool)
    try:
        assert "mailoutbox_demo" not in sa.inspect(engine).get_schema_names()
    finally:
        engine.dispose()


def test_demo_exits_1_when_deliveries_miss_their_expected_state(empty_db_url: sa.URL) -> None:
    """A demo whose worker cannot finish in time reports the failed checks and exits 1."""
    url = empty_db_url.render_as_string(hide_password=False)
    result = run_cli("demo", "--database-url", url, "--count", "500", "--timeout", "0.01s")
    assert result.exit_code == 1, result.output
    assert "FAIL the worker drained the outbox (deliveries still active after 0.0s)" in (
        result.stdout
    )


def test_demo_on_unreachable_database_exits_3() -> None:
    """A --database-url nobody answers gives the usual one-line exit 3."""
    result = run_cli("demo", "--database-url", "postgresql://postgres@127.0.0.1:1/x")
    assert result.exit_code == 3
    assert result.stderr.startswith("error: cannot reach the database")


def test_plan_mixes_plain_html_greylisted_refused_and_duplicate_mail() -> None:
    """The default mix: 2% refused, 5% greylisted, 20% html, 10 duplicate keys of 2,000."""
    plan = plan_mails(2000)
    assert len(plan) == 2000
    originals = [p for p in plan if p.duplicate_of is None]
    duplicates = [p for p in plan if p.duplicate_of is not None]
    assert len(duplicates) == 10
    assert Counter(p.expected for p in originals) == {
        Status.SENT: 1950,
        Status.DEAD_LETTERED: 40,
    }
    assert sum(p.greylisted for p in originals) == 100
    assert sum(p.html for p in originals) == 398
    keys = {(p.template_id, p.idempotency_key) for p in originals}
    assert len(keys) == len(originals)
    assert all((p.template_id, p.idempotency_key) in keys for p in duplicates)


def test_plan_of_a_few_mails_has_no_duplicates() -> None:
    """Below 20 mails the plan repeats no key."""
    plan = plan_mails(5)
    assert len(plan) == 5 and all(p.duplicate_of is None for p in plan)


def test_devsink_accepts_greylists_once_and_refuses_invalid_domains() -> None:
    """The sink's rules: 250 for most, 451 then 250 for greylisted*, 550 5.1.1 for .invalid."""
    with DevSink() as sink, smtplib.SMTP(sink.host, sink.port, timeout=5) as client:
        client.ehlo()
        assert client.mail("a@example.com")[0] == 250
        assert client.rcpt("ann@example.com")[0] == 250
        assert client.rcpt("greylisted1@example.net")[0] == 451
        assert client.rcpt("greylisted1@example.net")[0] == 250
        code, text = client.rcpt("bob@example.invalid")
        assert (code, text[:5]) == (550, b"5.1.1")
        assert client.data(b"Subject: hi\r\n\r\nhello\r\n")[0] == 250
        stats = sink.stats()
    assert (stats.messages, stats.greylisted, stats.refused) == (1, 1, 1)


def test_devsink_stop_joins_its_thread() -> None:
    """stop() ends the server thread, even with a client still connected."""
    before = set(threading.enumerate())
    sink = DevSink().start()
    client = smtplib.SMTP(sink.host, sink.port, timeout=5)
    try:
        assert set(threading.enumerate()) - before
        sink.stop()
        assert set(threading.enumerate()) - before == set()
    finally:
        client.close()
