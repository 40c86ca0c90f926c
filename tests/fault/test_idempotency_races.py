"""Scenario 8: processes race to enqueue the same keys, some of them rolling back.

Exactly one delivery exists for each key that some committed transaction
enqueued, none for keys that only rolled-back transactions used; every
committed transaction was handed the id that survived; and a worker sends
each of them once.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from mailoutbox import Mail, Outbox
from mailoutbox.transports.memory import MemoryTransport
from mailoutbox.worker import Worker

from .harness import ROOT, figures, rows, scalar, wait_for

PROCESSES = 4
KEYS = 2000
TRANSACTIONS = 250


def race(db_url: sa.URL, tmp_path: Path, seed: int) -> list[dict[str, object]]:
    gate = tmp_path / "go"
    procs = []
    outs = []
    for n in range(PROCESSES):
        out = tmp_path / f"enqueue-{n}.jsonl"
        outs.append(out)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.fault.enqueue_process",
                    db_url.render_as_string(hide_password=False),
                    str(out),
                    str(seed * 100 + n),
                    str(KEYS),
                    str(TRANSACTIONS),
                    str(gate),
                ],
                cwd=ROOT,
            )
        )
    time.sleep(1.5)  # let them import and connect
    gate.touch()
    try:
        codes = [p.wait(120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert codes == [0] * PROCESSES
    return [json.loads(line) for out in outs for line in out.read_text().splitlines()]


@pytest.mark.slow
def test_concurrent_enqueues_leave_one_delivery_per_committed_key(
    engine: sa.Engine, db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    records = race(db_url, tmp_path, seed=8)
    committed = [r for r in records if r["committed"]]
    rolled_back = [r for r in records if not r["committed"]]
    errors = collections.Counter(r["error"] for r in records if r["error"])
    committed_keys = {k for r in committed for k in r["keys"]}  # type: ignore[attr-defined]
    rolled_back_only = {k for r in rolled_back for k in r["keys"]} - committed_keys  # type: ignore[attr-defined]

    stored = dict(
        rows(
            engine,
            "SELECT idempotency_key, delivery_id::text FROM mailoutbox.mail_deliveries",
        )
    )
    # Exactly the committed keys, no more (the unique constraint makes it one row each).
    assert set(stored) == committed_keys
    assert not rolled_back_only & set(stored)
    # Every committed transaction was told the id that is stored, and for each key
    # exactly one committed transaction was told it created it.
    creators: collections.Counter[str] = collections.Counter()
    for r in committed:
        for key, delivery_id, created in zip(r["keys"], r["ids"], r["created"], strict=True):  # type: ignore[call-overload]
            assert stored[key] == delivery_id
            creators[key] += created
    assert set(creators.values()) == {1}
    # No orphans: one payload and one recipient row per delivery.
    assert rows(
        engine,
        "SELECT (SELECT count(*) FROM mailoutbox.mail_payloads),"
        " (SELECT count(*) FROM mailoutbox.mail_recipients)",
    ) == [(len(stored), len(stored))]

    transport = MemoryTransport()
    worker = Worker(outbox, transport, batch_size=100, name="race")
    worker.tick()
    worker.close()
    sends = collections.Counter(e.delivery_id for e in transport.sent)
    assert len(sends) == len(stored) and set(sends.values()) == {1}
    figures(
        "idempotency races",
        processes=PROCESSES,
        transactions=len(records),
        committed=len(committed),
        rolled_back=len(rolled_back),
        failed=dict(errors),
        keys_committed=len(committed_keys),
        keys_only_rolled_back=len(rolled_back_only),
        deliveries=len(stored),
        sends=sum(sends.values()),
    )


def test_overlapping_batches_in_opposite_orders_never_deadlock(
    engine: sa.Engine, outbox: Outbox
) -> None:
    """Two batches of the same 200 keys, one ascending, one descending, meet in the middle.

    A third transaction holds the middle key uncommitted, so both batches are
    sure to be half-way through their inserts, waiting on it, when it rolls back.
    """
    keys = [f"k{n:03d}" for n in range(200)]

    def mails(order: list[str]) -> list[Mail]:
        return [
            Mail(template_id="opposite", idempotency_key=k, to=["a@example.com"], text="x")
            for k in order
        ]

    results: dict[str, str] = {}

    def enqueue(name: str, order: list[str]) -> None:
        try:
            with engine.begin() as conn:
                outbox.enqueue_many(mails(order), connection=conn)
            results[name] = "ok"
        except sa.exc.DBAPIError as exc:
            results[name] = type(exc.orig).__name__

    with engine.connect() as holder:
        held = holder.begin()
        outbox.enqueue(mails(["k100"])[0], connection=holder)
        threads = [
            threading.Thread(target=enqueue, args=("ascending", keys)),
            threading.Thread(target=enqueue, args=("descending", keys[::-1])),
        ]
        for t in threads:
            t.start()
        wait_for(
            lambda: (
                scalar(
                    engine,
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                >= 2
            ),
            30,
            "both batches to wait on the held key",
        )
        held.rollback()
    for t in threads:
        t.join(60)
    figures("opposite-order batches", keys=len(keys), results=results)
    assert results == {"ascending": "ok", "descending": "ok"}
    assert scalar(engine, "SELECT count(*) FROM mailoutbox.mail_deliveries") == len(keys)
