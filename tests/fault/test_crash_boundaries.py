"""Scenario 2: a worker SIGKILLed at each boundary of claim -> send -> complete loses nothing.

The victim kills itself at the chosen point (see fault_worker.py), then an heir
takes over once the victim's lease has run out. At every boundary nothing is
lost. Duplicates appear only where the SMTP server had accepted messages whose
completion never became durable (``replied`` and ``completing``), and there
their number is exactly the accepted-but-unrecorded messages at the kill.
"""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from mailoutbox import Outbox, Status

from ..smtp_sink import SmtpSink
from .harness import (
    Workers,
    attempts_by_outcome,
    check_all_received,
    counts,
    duplicates,
    enqueue,
    figures,
    leased_by,
    received,
    received_count,
    sent,
    wait_for,
    wait_for_backends_to_end,
)

DELIVERIES = 60
BATCH = 10
LEASE = 2.0
VICTIM = ("--batch", str(BATCH), "--concurrency", "2", "--lease", str(LEASE))

# boundary -> (hook-at, whether duplicates are expected)
BOUNDARIES = {
    # The first send of the third batch: two batches completed, the third claimed only.
    "claimed": (2 * BATCH + 1, False),
    # The first send of all, stuck waiting for the server's reply to the message.
    "sending": (1, False),
    # Mid-batch, after the 250 of the 25th message.
    "replied": (25, True),
    # The third batch's sends are over, its completion never sent: nothing recorded.
    "completing": (3, True),
    # The third batch's completion (autocommit) reached the server; the worker died
    # before the reply.
    "committing": (3, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("boundary", list(BOUNDARIES))
def test_sigkill_at_boundary_loses_nothing(
    boundary: str, engine: sa.Engine, db_url: sa.URL, outbox: Outbox, sink: SmtpSink
) -> None:
    hook_at, duplicates_possible = BOUNDARIES[boundary]
    ids = enqueue(outbox, DELIVERIES)
    if boundary == "sending":
        sink.delays = {"DATA": 5.0}
    with Workers(db_url, sink) as workers:
        workers.start("victim", *VICTIM, "--hook", boundary, "--hook-at", str(hook_at))
        code = workers.wait_dead("victim", 60)
        killed_at = time.monotonic()
        assert code == -9, f"the victim exited with {code}, not by SIGKILL"
        # Let the server finish with the dead connections and PostgreSQL with the dead
        # backends (a COMMIT or a claim on the wire is still carried out).
        wait_for(lambda: sink.open_connections == 0, 10, "the victim's SMTP sessions to close")
        wait_for_backends_to_end(engine, "victim")
        sink.delays = {}
        received_at_kill = received_count(sink)
        sent_at_kill = sent(engine)
        leased_at_kill = leased_by(engine, "victim")
        workers.start("heir", "--batch", str(BATCH), "--lease", "30")
        wait_for(lambda: sent(engine) == DELIVERIES, 60, "every delivery sent")
        recovered = time.monotonic() - killed_at
        assert workers.stop_all() == {"victim": -9, "heir": 0}
    got = received(sink)
    lost = check_all_received(got, ids)
    dups = duplicates(got)
    outcomes = attempts_by_outcome(engine)
    figures(
        f"crash at {boundary}",
        deliveries=DELIVERIES,
        received_at_kill=received_at_kill,
        sent_rows_at_kill=sent_at_kill,
        leased_at_kill=leased_at_kill,
        duplicates=dups,
        lost=lost,
        recover_seconds=recovered,
        lease=LEASE,
    )
    assert lost == 0
    assert counts(engine)[Status.SENT] == DELIVERIES
    # Every lease the victim held was taken over, and recorded as such.
    assert outcomes.get("lease_expired", 0) == leased_at_kill
    assert outcomes["sent"] == DELIVERIES
    # Re-sent: exactly what the server had accepted and the database had not recorded.
    assert dups == received_at_kill - sent_at_kill
    if duplicates_possible:
        assert dups > 0
    else:
        assert dups == 0
    if boundary == "committing":
        # The fourth batch is claimed beside the third's record, never before its
        # sends are over: it may be leased at the kill, but none of it was sent.
        assert sent_at_kill == 3 * BATCH and leased_at_kill in (0, BATCH)
    if boundary == "claimed":
        assert sent_at_kill == 2 * BATCH and leased_at_kill == BATCH
