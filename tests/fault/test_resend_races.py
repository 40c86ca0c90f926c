"""Scenario 9: operators resend deliveries while workers are sending them.

Worker processes send through a real SMTP server; half of the sends fail with
an injected 5xx (dead-lettering the delivery), and threads of the test keep
resending random deliveries meanwhile, many of them while a worker holds them.
One resend never yields two sends: per delivery, send attempts after the first
cycle never outnumber successful resends, no lease is ever lost, and a sent
delivery is received once and never re-armed.
"""

from __future__ import annotations

import collections
import random
import threading
import time
import uuid
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from mailoutbox import (
    Delivery,
    InvalidTransition,
    Outbox,
    Outcome,
    PermanentSendError,
    ResendOnSent,
    Status,
)
from mailoutbox.records import AttemptRecord, Completion
from mailoutbox.transports.memory import MemoryTransport
from mailoutbox.worker import Worker

from ..smtp_sink import SmtpSink
from .harness import (
    Workers,
    attempts_by_outcome,
    counts,
    enqueue,
    figures,
    message_id,
    received,
    rows,
    wait_for,
)

DELIVERIES = 150
RESENDERS = 3
RACE_SECONDS = 8.0


@pytest.mark.slow
def test_one_resend_never_yields_two_sends(
    engine: sa.Engine, db_url: sa.URL, outbox: Outbox, sink: SmtpSink
) -> None:
    ids = enqueue(outbox, DELIVERIES)

    # Every delivery starts dead-lettered after one failed attempt.
    def refuse(envelope: object) -> None:
        raise PermanentSendError(550, "5.1.1 no such user")

    first = Worker(outbox, MemoryTransport(refuse), batch_size=100, name="first")
    first.tick()
    first.close()
    assert counts(engine)[Status.DEAD_LETTERED] == DELIVERIES

    resends: collections.Counter[object] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def resender(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not stop.is_set():
                delivery_id = rng.choice(ids)
                try:
                    outbox.resend(delivery_id)
                    result = "resent"
                except ResendOnSent:
                    result = "refused: sent"
                except InvalidTransition as exc:
                    result = f"refused: {exc.status}"
                with lock:
                    outcomes[result] += 1
                    if result == "resent":
                        resends[delivery_id] += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            errors.append(exc)

    args = ("--batch", "5", "--concurrency", "2", "--delay", "0.03", "--lease", "30")
    with Workers(db_url, sink) as workers:
        for n in range(2):
            workers.start(f"w{n}", *args, "--fail-permanent", "0.5")
        threads = [threading.Thread(target=resender, args=(n,)) for n in range(RESENDERS)]
        for t in threads:
            t.start()
        time.sleep(RACE_SECONDS)
        stop.set()
        for t in threads:
            t.join(30)
        # Let the workers finish what the last resends armed.
        wait_for(
            lambda: counts(engine)[Status.SENDING] + counts(engine)[Status.PENDING] == 0,
            60,
            "the workers to settle",
        )
        codes = workers.stop_all()
    assert not errors, errors
    assert codes == {"w0": 0, "w1": 0}

    got = received(sink)
    final = dict(rows(engine, "SELECT delivery_id, status FROM mailoutbox.mail_deliveries"))
    sends_after_resend = dict(
        rows(
            engine,
            "SELECT delivery_id, count(*) FROM mailoutbox.mail_attempts"
            " WHERE attempt_no > 1 AND outcome IN ('sent', 'permanent_failure')"
            " GROUP BY delivery_id",
        )
    )
    too_many = {d: (n, resends[d]) for d, n in sends_after_resend.items() if n > resends[d]}
    by_outcome = attempts_by_outcome(engine)
    figures(
        "resend races",
        deliveries=DELIVERIES,
        resend_calls=sum(outcomes.values()),
        **{k.replace(":", ""): v for k, v in sorted(outcomes.items())},
        send_attempts_after_resend=sum(sends_after_resend.values()),
        received=sum(got.values()),
        sent=counts(engine)[Status.SENT],
        dead_lettered=counts(engine)[Status.DEAD_LETTERED],
        deliveries_with_more_sends_than_resends=len(too_many),
    )
    assert not too_many
    assert "lease_expired" not in by_outcome
    assert outcomes["refused: sending"] > 0, "no resend ever raced a send in progress"
    for delivery_id, status in final.items():
        expected = 1 if status == Status.SENT.value else 0
        assert got[message_id(delivery_id)] == expected


def _act_while_a_completion_commits(
    engine: sa.Engine,
    outbox: Outbox,
    status: Status,
    attempt: AttemptRecord,
    act: Callable[[uuid.UUID], Delivery],
) -> str:
    """Run `act` on a claimed delivery while a worker's completion (to `status`) is
    held uncommitted; the completion commits just before `act` first reads a row.

    The guarded UPDATE sees the delivery still `sending` and matches nothing (the
    row it sees fails the guard, so it does not wait for the lock); the read
    that follows must not name that stale state. Returns the new status, or
    "refused: <state named>".
    """
    [delivery_id] = enqueue(outbox, 1)
    with engine.begin() as conn:
        [claimed] = outbox.store.claim_due(conn, limit=1, worker="w", lease_seconds=60)
    completion = Completion(
        delivery_id=delivery_id,
        claim_token=claimed.claim_token,
        status=status,
        attempt=attempt,
        reason=attempt.error,
        worker="w",
    )
    fired: list[bool] = []
    with engine.connect() as worker_conn:
        held = worker_conn.begin()
        assert outbox.store.complete(worker_conn, [completion]) == {delivery_id}

        def commit_before_the_read(
            conn: sa.Connection, cursor: object, statement: str, *args: object
        ) -> None:
            if conn is not worker_conn and not fired and statement.lstrip().startswith("SELECT"):
                fired.append(True)
                held.commit()

        sa.event.listen(engine, "before_cursor_execute", commit_before_the_read)
        try:
            try:
                outcome = act(delivery_id).status.value
            except InvalidTransition as exc:
                outcome = f"refused: {exc.status}"
        finally:
            sa.event.remove(engine, "before_cursor_execute", commit_before_the_read)
    assert fired
    return outcome


def test_a_refused_resend_names_a_state_that_refuses_it(engine: sa.Engine, outbox: Outbox) -> None:
    """The race the scenario above hit once in a few thousand resends, made certain:
    the completion dead-letters the delivery just before resend reads it."""
    failed = AttemptRecord(Outcome.PERMANENT_FAILURE, error="550 5.1.1 no such user")
    outcome = _act_while_a_completion_commits(
        engine, outbox, Status.DEAD_LETTERED, failed, outbox.resend
    )
    figures("resend vs completing worker", outcome=outcome)
    # Resent (now pending), or refused for a state that does refuse it.
    assert outcome in ("pending", "refused: sending", "refused: sent")


def test_a_refused_cancel_names_a_state_that_refuses_it(engine: sa.Engine, outbox: Outbox) -> None:
    """Cancel's twin of the race: the worker puts the delivery back to retrying just
    before cancel reads it. Refusing with "it is retrying" would tell the operator
    the mail cannot be stopped, and it would then go out at its next retry."""
    deferred = AttemptRecord(Outcome.TRANSIENT_FAILURE, error="451 4.7.1 try again later")
    outcome = _act_while_a_completion_commits(
        engine, outbox, Status.RETRYING, deferred, outbox.cancel
    )
    figures("cancel vs completing worker", outcome=outcome)
    assert outcome == "cancelled"
