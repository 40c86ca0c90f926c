"""Scenario 3: random SIGKILLs of workers during a run, each replaced by a new worker.

Everything ends `sent` within the lease plus one poll interval (plus the time to
start a process) after the last kill; duplicates never exceed the deliveries
the killed workers held leased when they died, and each of those leases shows
up as one `lease_expired` attempt.
"""

from __future__ import annotations

import os
import random
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
    scalar,
    sent,
    wait_for,
    wait_for_backends_to_end,
)

# The issue: 5,000 deliveries, ~30 kills. Two cores: 3,000 deliveries, 20 kills, 3 workers.
DELIVERIES = int(os.environ.get("FAULT_KILL_DELIVERIES", "3000"))
KILLS = int(os.environ.get("FAULT_KILLS", "20"))
WORKERS = 3
LEASE = 2.0
POLL = 0.2
# A process needs about a second to start on a loaded 2-core machine; allow for it twice.
SLACK = 3.0
ARGS = (
    "--batch", "10", "--concurrency", "4", "--delay", "0.02",
    "--lease", str(LEASE), "--poll", str(POLL),
)  # fmt: skip


def waiting(engine: sa.Engine) -> int:
    """Deliveries not yet claimed (pending or retrying)."""
    return int(
        scalar(
            engine,
            "SELECT count(*) FROM mailoutbox.mail_deliveries"
            " WHERE status IN ('pending', 'retrying')",
        )
    )


@pytest.mark.slow
def test_random_kills_lose_nothing(
    engine: sa.Engine, db_url: sa.URL, outbox: Outbox, sink: SmtpSink
) -> None:
    rng = random.Random(5)
    ids = enqueue(outbox, DELIVERIES)
    held_at_kills = 0
    kills = 0
    with Workers(db_url, sink) as workers:
        for n in range(WORKERS):
            workers.start(f"w{n}", *ARGS)
        generation = WORKERS
        wait_for(lambda: sent(engine) > 0, 30, "the first delivery")
        began, sent_before = time.monotonic(), sent(engine)
        last_kill = began

        def kill_one(victim: str) -> None:
            nonlocal kills, held_at_kills, generation, last_kill
            workers.kill(victim)
            last_kill = time.monotonic()
            kills += 1
            wait_for_backends_to_end(engine, victim)
            held_at_kills += leased_by(engine, victim)
            workers.start(f"w{generation}", *ARGS)
            generation += 1

        # KILLS - 1 kills spread over the run whatever the machine's speed: the interval
        # is re-estimated from the delivery rate so far.
        intervals = []
        while kills < KILLS - 1 and (left := waiting(engine)) > 0:
            rate = max(1.0, (sent(engine) - sent_before) / (time.monotonic() - began))
            interval = min(2.0, max(0.2, left / rate / (KILLS - kills)))
            intervals.append(interval)
            time.sleep(interval * rng.uniform(0.7, 1.3))
            kill_one(rng.choice(workers.alive()))
        # The last kill once nothing is waiting any more: all that is left are leases,
        # the killed worker's among them, so recovery is lease expiry plus one poll.
        wait_for(lambda: waiting(engine) == 0, 120, "the backlog to drain", 0.02)
        busiest = max(workers.alive(), key=lambda name: leased_by(engine, name))
        kill_one(busiest)
        interval = sum(intervals) / max(1, len(intervals))
        recover = wait_for(lambda: sent(engine) == DELIVERIES, 120, "every delivery sent", 0.1)
        recovered_after_last_kill = time.monotonic() - last_kill
        codes = workers.stop_all()
    assert sum(code == 0 for code in codes.values()) == WORKERS
    got = received(sink)
    lost = check_all_received(got, ids)
    dups = duplicates(got)
    outcomes = attempts_by_outcome(engine)
    figures(
        "random kills",
        deliveries=DELIVERIES,
        kills=kills,
        held_at_kills=held_at_kills,
        duplicates=dups,
        lost=lost,
        lease_expired_attempts=outcomes.get("lease_expired", 0),
        kill_interval=interval,
        all_sent_after_last_kill_seconds=recovered_after_last_kill,
        bound_seconds=LEASE + POLL + SLACK,
        drain_wait=recover,
    )
    assert kills == KILLS
    assert lost == 0
    assert counts(engine)[Status.SENT] == DELIVERIES
    assert dups <= held_at_kills
    # Each lease a killed worker still held is taken over and recorded as lease_expired.
    # `held_at_kills` is read once the victim's backends have ended, so every statement it
    # had sent (a claim, a COMMIT) has landed.
    assert 0 < outcomes.get("lease_expired", 0) == held_at_kills
    assert outcomes["sent"] == DELIVERIES
    assert recovered_after_last_kill <= LEASE + POLL + SLACK
