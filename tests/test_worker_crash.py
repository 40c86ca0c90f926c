"""Real worker processes killed and stopped against real PostgreSQL: nothing is lost."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from mailoutbox import Outbox, Outcome, Status

from .factories import make_mail, wait_until

ROOT = Path(__file__).resolve().parent.parent


def start_worker(url: sa.URL, log: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.worker_process",
            url.render_as_string(hide_password=False),
            str(log),
            "--name",
            name,
            *args,
        ],
        cwd=ROOT,
    )


def lines(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def leased_by(engine: sa.Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM mailoutbox.mail_deliveries WHERE locked_by = :n"),
                {"n": name},
            ).scalar_one()
        )


def test_sigkill_mid_batch_loses_nothing(
    engine: sa.Engine, db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """After a SIGKILL, another worker sends the rest once the lease expires.

    Duplicates are bounded by what the killed worker held leased at the kill.
    """
    log = tmp_path / "sent.log"
    ids = {r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(80)])}
    victim = start_worker(
        db_url, log, "victim", "--lease", "2", "--batch", "20", "--concurrency", "4"
    )
    try:
        wait_until(lambda: len(lines(log)) >= 25, 30, "the victim to send some mail")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        victim.kill()
    held = leased_by(engine, "victim")
    sent_before = len(lines(log))
    heir = start_worker(db_url, log, "heir", "--lease", "2")
    try:
        wait_until(lambda: outbox.count_by_status()[Status.SENT] == 80, 60, "all mail sent")
    finally:
        heir.send_signal(signal.SIGTERM)
        assert heir.wait(20) == 0
    received = collections.Counter(lines(log))
    assert {f"<{i}@example.com>" for i in ids} == set(received)
    duplicates = sum(received.values()) - len(ids)
    print(
        f"\nsigkill: 80 deliveries, {sent_before} sent before the kill, {held} leased at the "
        f"kill, {duplicates} duplicates, 0 lost"
    )
    assert duplicates <= held
    lost_attempts = sum(
        a.outcome is Outcome.LEASE_EXPIRED for i in ids for a in outbox.list_attempts(i)
    )
    # `held` is read just after the kill; a COMMIT already on its way can still land.
    assert 0 < lost_attempts <= held


def kill_rounds_with_poison(
    db_url: sa.URL,
    outbox: Outbox,
    log: Path,
    poison: uuid.UUID,
    others: list[uuid.UUID],
    *,
    batch: int,
) -> int:
    """Start workers (max 3 attempts, one send thread) one after another until the
    poison mail is dead-lettered and the others are sent; answer how many were SIGKILLed."""

    def finished() -> bool:
        statuses = {outbox.get_delivery(i).status for i in [poison, *others]}
        return statuses == {Status.DEAD_LETTERED, Status.SENT}

    kills = 0
    for round_ in range(8):
        if finished():
            break
        proc = start_worker(
            db_url,
            log,
            f"w{round_}",
            "--lease",
            "1",
            "--batch",
            str(batch),
            "--concurrency",
            "1",
            "--max-attempts",
            "3",
        )
        try:
            wait_until(
                lambda proc=proc: proc.poll() is not None or finished(),  # type: ignore[misc]
                30,
                "the worker to die or to finish the mail",
            )
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(20)
            else:
                kills += proc.returncode == -signal.SIGKILL
        time.sleep(1.1)  # let the lease of the dead worker run out
    return kills


def test_delivery_that_kills_its_worker_every_time_ends_dead_lettered(
    engine: sa.Engine, db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """A poison mail that SIGKILLs each worker is dead-lettered after max attempts."""
    log = tmp_path / "sent.log"
    poison = outbox.enqueue(make_mail(subject="poison")).delivery_id
    others = [r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(5)])]
    kills = kill_rounds_with_poison(db_url, outbox, log, poison, others, batch=1)
    delivery = outbox.get_delivery(poison)
    assert delivery.status is Status.DEAD_LETTERED
    assert delivery.last_error.startswith("attempts exhausted (3)")
    assert kills == 3
    outcomes = [a.outcome for a in outbox.list_attempts(poison)]
    assert outcomes == [Outcome.LEASE_EXPIRED] * 3
    for other in others:
        assert outbox.get_delivery(other).status is Status.SENT


def test_a_poison_mail_does_not_take_its_batch_mates_down_with_it(
    engine: sa.Engine, db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """The mail claimed in one batch with a poison mail is charged one attempt, then sent.

    Each death leaves the whole batch leased. Claimed again together, the mates
    would be charged an attempt at every death of the poison's, and be
    dead-lettered with it; a row whose lease expired is therefore claimed alone.
    """
    log = tmp_path / "sent.log"
    poison = outbox.enqueue(make_mail(subject="poison")).delivery_id
    mates = [r.delivery_id for r in outbox.enqueue_many([make_mail() for _ in range(9)])]
    kills = kill_rounds_with_poison(db_url, outbox, log, poison, mates, batch=10)
    assert kills == 3
    delivery = outbox.get_delivery(poison)
    assert delivery.status is Status.DEAD_LETTERED
    assert [a.outcome for a in outbox.list_attempts(poison)] == [Outcome.LEASE_EXPIRED] * 3
    # The poison, enqueued first, is the first send of the first batch: its first
    # death leaves the nine mates leased and unsent, and charges each of them once.
    for mate in mates:
        assert outbox.get_delivery(mate).status is Status.SENT
        outcomes = [a.outcome for a in outbox.list_attempts(mate)]
        assert outcomes == [Outcome.LEASE_EXPIRED, Outcome.SENT]
    assert len(lines(log)) == len(set(lines(log))) == 9


def test_sigterm_finishes_in_flight_and_leaves_no_lease(
    engine: sa.Engine, db_url: sa.URL, outbox: Outbox, tmp_path: Path
) -> None:
    """SIGTERM: the worker completes what it was sending, releases the rest, exits 0."""
    log = tmp_path / "sent.log"
    outbox.enqueue_many([make_mail() for _ in range(40)])
    proc = start_worker(
        db_url,
        log,
        "graceful",
        "--delay",
        "0.3",
        "--batch",
        "20",
        "--concurrency",
        "2",
        "--lease",
        "60",
    )
    try:
        wait_until(lambda: len(lines(log)) >= 2, 30, "the first sends")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
    counts = outbox.count_by_status()
    assert leased_by(engine, "graceful") == 0
    assert counts[Status.SENDING] == 0
    assert counts[Status.SENT] == len(lines(log)) == len(set(lines(log)))
    assert counts[Status.SENT] + counts[Status.PENDING] == 40
