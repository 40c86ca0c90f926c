"""Helpers the fault scenarios share: worker processes, waiting, and counting."""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from mailoutbox import Mail, Outbox, Status

from ..smtp_sink import SmtpSink
from .fault_worker import APPLICATION_NAME

ROOT = Path(__file__).resolve().parents[2]
SENDER = "noreply@example.com"
__all__ = ["APPLICATION_NAME"]


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Poll `condition` until true; return the seconds it took (AssertionError on timeout)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


class Workers:
    """Worker processes started by one test; every one of them is ended on exit."""

    def __init__(self, url: sa.URL, sink: SmtpSink | None = None) -> None:
        self.url = url.render_as_string(hide_password=False)
        self.sink = sink
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # Each worker's stderr (its log) goes to a file, read back by `log()`.
        self.log_dir = Path(tempfile.mkdtemp(prefix="mailoutbox-fault-logs-"))

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        smtp = ["--smtp", f"{self.sink.host}:{self.sink.port}"] if self.sink else []
        with (self.log_dir / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.fault.fault_worker",
                    self.url,
                    "--name",
                    name,
                    *smtp,
                    *args,
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.procs[name] = proc
        return proc

    def log(self) -> str:
        """Everything the workers logged so far."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log")))

    def alive(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def wait_dead(self, name: str, timeout: float = 30) -> int:
        return self.procs[name].wait(timeout)

    def stop_all(self, timeout: float = 30) -> dict[str, int | None]:
        """SIGTERM every live worker and collect exit codes (SIGKILL after `timeout`).

        A worker started a moment ago may still be importing, and a SIGTERM then ends
        it with -15: each is given until `timeout` to say it is ready first.
        """
        from .fault_worker import READY

        for name, proc in self.procs.items():
            log = self.log_dir / f"{name}.log"
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if READY in log.read_text(errors="replace"):
                    break
                time.sleep(0.05)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                codes[name] = None
        return codes

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        if exc_info[0] is not None:
            print(f"\n--- worker logs (tail) ---\n{self.log()[-5000:]}")
        shutil.rmtree(self.log_dir, ignore_errors=True)


def mail(i: int, **overrides: Any) -> Mail:
    values: dict[str, Any] = {
        "template_id": "fault",
        "idempotency_key": f"k-{i}",
        "to": [f"user{i}@example.com"],
        "subject": f"Fault test {i}",
        "text": f"Hello {i}",
    }
    values.update(overrides)
    return Mail(**values)


def enqueue(outbox: Outbox, count: int, *, chunk: int = 1000, **overrides: Any) -> list[uuid.UUID]:
    """Enqueue `count` distinct mails in chunks; return their delivery ids in order."""
    ids: list[uuid.UUID] = []
    for start in range(0, count, chunk):
        mails = [mail(i, **overrides) for i in range(start, min(count, start + chunk))]
        ids.extend(e.delivery_id for e in outbox.enqueue_many(mails))
    return ids


def message_id(delivery_id: uuid.UUID) -> str:
    return f"<{delivery_id}@example.com>"


def received(sink: SmtpSink) -> collections.Counter[str]:
    """How many times the sink accepted each Message-ID."""
    return collections.Counter(m.message_id or "" for m in list(sink.messages))


def received_count(sink: SmtpSink) -> int:
    return len(sink.messages)


def scalar(engine: sa.Engine, sql: str, **params: Any) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar_one()


def rows(engine: sa.Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params))


def counts(engine: sa.Engine) -> dict[Status, int]:
    out = {s: 0 for s in Status}
    for status, n in rows(
        engine, "SELECT status, count(*) FROM mailoutbox.mail_deliveries GROUP BY status"
    ):
        out[Status(status)] = n
    return out


def sent(engine: sa.Engine) -> int:
    return int(
        scalar(engine, "SELECT count(*) FROM mailoutbox.mail_deliveries WHERE status = 'sent'")
    )


def backends_of(engine: sa.Engine, name: str) -> int:
    """Server backends still open for worker `name` (see fault_worker's application_name)."""
    return int(
        scalar(
            engine,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app",
            app=f"{APPLICATION_NAME}/{name}",
        )
    )


def wait_for_backends_to_end(engine: sa.Engine, name: str) -> None:
    """After a SIGKILL: a statement the worker had sent (a claim, a COMMIT) still runs to
    its end on the server; its backend exits only then, when it reads the closed socket."""
    wait_for(lambda: backends_of(engine, name) == 0, 10, f"the backends of {name} to end", 0.02)


def leased_by(engine: sa.Engine, name: str) -> int:
    return int(
        scalar(
            engine,
            "SELECT count(*) FROM mailoutbox.mail_deliveries"
            " WHERE status = 'sending' AND locked_by = :n",
            n=name,
        )
    )


def attempts_by_outcome(engine: sa.Engine) -> dict[str, int]:
    return dict(
        rows(engine, "SELECT outcome, count(*) FROM mailoutbox.mail_attempts GROUP BY outcome")
    )


def duplicates(counter: collections.Counter[str]) -> int:
    return sum(n - 1 for n in counter.values() if n > 1)


def check_all_received(counter: collections.Counter[str], ids: Iterable[uuid.UUID]) -> int:
    """Assert every delivery reached the sink and nothing else did; return how many are lost."""
    expected = {message_id(i) for i in ids}
    lost = expected - set(counter)
    strangers = set(counter) - expected
    assert not strangers, f"{len(strangers)} unknown Message-IDs received"
    return len(lost)


@contextlib.contextmanager
def running_sink(**kwargs: Any) -> Iterator[SmtpSink]:
    sink = SmtpSink(**kwargs)
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()


def figures(title: str, **values: Any) -> None:
    """Print a scenario's figures on one line (pytest -s shows them)."""
    body = ", ".join(
        f"{k.replace('_', ' ')}={v:.2f}" if isinstance(v, float) else f"{k.replace('_', ' ')}={v}"
        for k, v in values.items()
    )
    print(f"\n[{title}] {body}", flush=True)
