"""A worker process for the fault suite: ``python -m tests.fault.fault_worker URL --name N ...``.

It runs `Worker.run()` until SIGTERM, sending through a real `SmtpTransport`
(``--smtp HOST:PORT``) or into a null transport. Hooks kill the process with
SIGKILL at a chosen boundary of the claim -> send -> complete cycle:

- ``claimed``: at the start of send number ``--hook-at`` (make it the first send
  of a batch): the claim has committed and nothing of the batch went out;
- ``sending``: send number ``--hook-at`` is in progress (the test makes the
  SMTP server slow); the process dies 0.3 s into it;
- ``replied``: right after send number ``--hook-at`` got its 250 reply, before
  the batch's completion is recorded;
- ``completing``: the sends of batch ``--hook-at`` are over, its completion has
  not been sent;
- ``committing``: the completion of batch ``--hook-at`` is on the wire, its reply
  not read (the record runs in autocommit: the statement is its own commit).

``--fail-permanent`` makes that fraction of sends fail with a 5xx before they
reach the server (resend races). With ``--stats PATH`` it writes a JSON line
with its peak RSS (VmHWM) when it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NoReturn

import sqlalchemy as sa
from psycopg import pq
from psycopg._queries import PostgresQuery  # to send a statement without waiting for it
from psycopg.adapt import Transformer

from mailoutbox import Outbox, PermanentSendError
from mailoutbox import operations as ops
from mailoutbox.direct import DirectConnection
from mailoutbox.records import Completion
from mailoutbox.retry import RetryPolicy
from mailoutbox.transports.base import Envelope, SendResult
from mailoutbox.transports.null import NullTransport
from mailoutbox.transports.smtp import SmtpTransport
from mailoutbox.worker import Worker

APPLICATION_NAME = "mailoutbox-fault-worker"
HOOKS = ("claimed", "sending", "replied", "completing", "committing")
# Written to the log once SIGTERM stops the worker gracefully (harness.Workers.stop_all).
READY = "fault worker ready"


def peak_rss_kib() -> int:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec,
    so it would report the forking test process's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def die() -> NoReturn:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # never reached; SIGKILL cannot be caught
    raise SystemExit("SIGKILL did not kill this process")


class HookedTransport:
    """Wraps the real transport: a delay, injected 5xx failures and the send-side hooks."""

    def __init__(
        self, inner: Any, *, delay: float, hook: str | None, hook_at: int, fail_rate: float
    ) -> None:
        self.inner = inner
        self.delay = delay
        self.hook = hook
        self.hook_at = hook_at
        self.fail_rate = fail_rate
        self.calls = 0
        self.lock = threading.Lock()

    def send(self, envelope: Envelope) -> SendResult | None:
        with self.lock:
            self.calls += 1
            n = self.calls
        if n == self.hook_at and self.hook == "claimed":
            die()
        if n == self.hook_at and self.hook == "sending":
            threading.Timer(0.3, die).start()
        if self.delay:
            time.sleep(self.delay)
        if self.fail_rate and random.random() < self.fail_rate:
            raise PermanentSendError(554, "5.7.1 injected permanent failure")
        result = self.inner.send(envelope)
        if n == self.hook_at and self.hook == "replied":
            die()
        return result  # type: ignore[no-any-return]

    def close(self) -> None:
        self.inner.close()


def hook_completion(outbox: Outbox, hook: str, hook_at: int) -> None:
    """Wrap the store's complete() (on this instance) to die around the completion's commit."""
    store = outbox.store
    real = store.complete
    calls = 0

    def complete(
        conn: sa.Connection | DirectConnection, completions: Sequence[Completion]
    ) -> set[uuid.UUID]:
        nonlocal calls
        calls += 1
        if calls != hook_at:
            return real(conn, completions)
        if hook == "committing":
            assert isinstance(conn, DirectConnection), "the worker records on psycopg directly"
            # Put the completion on the wire ourselves, make sure it left, and die
            # before the reply: the server commits it, the worker never learns it.
            query = next(ops.complete(outbox.tables, completions))
            send_without_reading_the_reply(conn, *ops.driver_call(query, outbox.engine.dialect))
        die()

    store.complete = complete  # type: ignore[method-assign]


def send_without_reading_the_reply(conn: DirectConnection, sql: str, params: Any) -> None:
    """Send a statement as psycopg's binary cursor would, and return once it has left."""
    driver = conn.driver
    assert driver.autocommit, "the record of a whole batch runs in autocommit"
    query = PostgresQuery(Transformer(driver))
    query.convert(sql, params)
    pgconn = driver.pgconn
    pgconn.send_query_params(
        query.query,
        query.params,
        param_formats=query.formats,
        param_types=query.types,
        result_format=pq.Format.BINARY,
    )
    while pgconn.flush():
        time.sleep(0.001)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--name", required=True)
    parser.add_argument("--smtp", help="HOST:PORT of an SMTP server (else a null transport)")
    parser.add_argument("--smtp-timeout", type=float, default=5.0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--poll", type=float, default=0.2)
    parser.add_argument("--max-attempts", type=int, default=8)
    parser.add_argument("--base-delay", type=float, default=0.0)
    parser.add_argument("--max-delay", type=float, default=0.0)
    parser.add_argument("--hook", choices=HOOKS)
    parser.add_argument("--hook-at", type=int, default=1)
    parser.add_argument("--fail-permanent", type=float, default=0.0)
    parser.add_argument("--stats")
    args = parser.parse_args()

    # Named per worker, so a test can wait for a killed worker's backends to end.
    url = sa.make_url(args.url).update_query_dict(
        {"application_name": f"{APPLICATION_NAME}/{args.name}"}
    )
    engine = sa.create_engine(url, pool_size=2, max_overflow=2)
    outbox = Outbox(engine)
    if args.hook in ("completing", "committing"):
        hook_completion(outbox, args.hook, args.hook_at)
    if args.smtp:
        host, _, port = args.smtp.rpartition(":")
        inner: Any = SmtpTransport(
            host, int(port), security="none", timeout=args.smtp_timeout, local_hostname="worker"
        )
    else:
        inner = NullTransport()
    transport = HookedTransport(
        inner,
        delay=args.delay,
        hook=args.hook,
        hook_at=args.hook_at,
        fail_rate=args.fail_permanent,
    )
    worker = Worker(
        outbox,
        transport,
        retry=RetryPolicy(
            max_attempts=args.max_attempts,
            base_delay=timedelta(seconds=args.base_delay),
            max_delay=timedelta(seconds=args.max_delay),
        ),
        batch_size=args.batch,
        concurrency=args.concurrency,
        lease=timedelta(seconds=args.lease),
        poll_interval=timedelta(seconds=args.poll),
        name=args.name,
    )
    # Ready: from here a SIGTERM is a graceful stop (run() takes over the handler). Before,
    # one arriving while the process still imports ends it with -15 (Workers.stop_all waits).
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    print(READY, file=sys.stderr, flush=True)
    worker.run(stop)
    engine.dispose()
    if args.stats:
        with open(args.stats, "a") as f:
            f.write(json.dumps({"name": args.name, "vm_hwm_kib": peak_rss_kib()}) + "\n")


if __name__ == "__main__":
    main()
