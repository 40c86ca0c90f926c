"""RetryPolicy: pure unit tests with injected randomness and clock."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailoutbox.retry import RetryAction, RetryDecision, RetryPolicy

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
ALMOST_ONE = 1.0 - 1e-12


def policy(rng_value: float = 0.5, **kwargs: object) -> RetryPolicy:
    return RetryPolicy(rng=lambda: rng_value, **kwargs)  # type: ignore[arg-type]


def test_defaults_suit_transactional_mail() -> None:
    """The defaults are 8 attempts, 30 s base, 1 h cap and a 2-day max age."""
    default = RetryPolicy()

    assert default.max_attempts == 8
    assert default.base_delay == timedelta(seconds=30)
    assert default.max_delay == timedelta(hours=1)
    assert default.max_age == timedelta(days=2)


def test_default_schedule_spans_about_an_hour() -> None:
    """The seven retries of the default policy back off for at most about an hour in total."""
    default = RetryPolicy()

    worst_case = sum((default.ceiling(n) for n in range(1, 8)), timedelta(0))

    assert worst_case == timedelta(seconds=30 * (2**7 - 1))
    assert timedelta(hours=1) <= worst_case <= timedelta(hours=1, minutes=5)


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 6, 7])
def test_delay_ceiling_doubles_per_attempt(attempt: int) -> None:
    """The jitter ceiling is base_delay * 2**(attempt-1) below the cap."""
    assert RetryPolicy().ceiling(attempt) == timedelta(seconds=30) * 2 ** (attempt - 1)


@pytest.mark.parametrize("attempt", [1, 3, 7])
def test_delay_is_zero_at_the_bottom_of_the_jitter(attempt: int) -> None:
    """An rng returning 0 gives a delay of 0 (full jitter starts at zero)."""
    assert policy(0.0).delay(attempt) == timedelta(0)


@pytest.mark.parametrize("attempt", [1, 3, 7])
def test_delay_stays_below_the_ceiling(attempt: int) -> None:
    """An rng just below 1 gives a delay just below the ceiling, never above it."""
    p = policy(ALMOST_ONE)

    delay = p.delay(attempt)

    assert p.ceiling(attempt) - timedelta(milliseconds=1) < delay <= p.ceiling(attempt)


def test_delay_scales_linearly_with_the_rng() -> None:
    """The delay is the rng's fraction of the ceiling."""
    assert policy(0.25).delay(3) == timedelta(seconds=30)


def test_delay_is_capped_at_max_delay() -> None:
    """Past the doubling range the ceiling stays at max_delay."""
    p = policy(ALMOST_ONE)

    assert p.ceiling(8) == timedelta(hours=1)
    assert p.ceiling(40) == timedelta(hours=1)
    assert p.delay(40) <= timedelta(hours=1)


def test_zero_delays_retry_at_once() -> None:
    """base_delay=0 and max_delay=0 give a zero delay and an immediate retry."""
    p = policy(ALMOST_ONE, base_delay=timedelta(0), max_delay=timedelta(0))

    decision = p.decide(attempts=3, created_at=NOW, now=NOW, permanent=False)

    assert p.delay(1) == timedelta(0)
    assert decision == RetryDecision(RetryAction.RETRY, delay=timedelta(0))


def test_huge_attempt_number_does_not_overflow() -> None:
    """Attempt 10_000 gives a capped delay, even with the largest possible cap."""
    assert policy(ALMOST_ONE).delay(10_000) <= timedelta(hours=1)
    huge = policy(ALMOST_ONE, max_delay=timedelta.max)
    assert timedelta(0) <= huge.delay(10_000) <= timedelta.max


def test_out_of_range_rng_is_clamped() -> None:
    """An rng outside [0, 1) cannot produce a negative or over-cap delay."""
    assert policy(-3.0).delay(2) == timedelta(0)
    assert policy(7.0).delay(2) == timedelta(minutes=1)


@given(
    attempt=st.integers(min_value=1, max_value=10**6),
    fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_delay_always_within_zero_and_cap(attempt: int, fraction: float) -> None:
    """For any attempt and rng value, 0 <= delay <= ceiling <= max_delay."""
    p = policy(fraction)

    assert timedelta(0) <= p.delay(attempt) <= p.ceiling(attempt) <= p.max_delay


def test_default_rng_stays_in_bounds() -> None:
    """With the real random source, delays stay within [0, ceiling]."""
    p = RetryPolicy()

    delays = [p.delay(4) for _ in range(500)]

    assert all(timedelta(0) <= d <= p.ceiling(4) for d in delays)
    assert len(set(delays)) > 1


def test_transient_failure_retries_after_the_delay() -> None:
    """A transient failure with attempts left retries after delay(attempts)."""
    p = policy(0.5)

    decision = p.decide(attempts=2, created_at=NOW, now=NOW, permanent=False)

    assert decision.should_retry
    assert decision.delay == timedelta(seconds=30)
    assert decision.reason == ""


def test_permanent_failure_gives_up_at_once() -> None:
    """A permanent failure gives up on the first attempt."""
    decision = policy().decide(attempts=1, created_at=NOW, now=NOW, permanent=True)

    assert decision == RetryDecision.give_up("permanent failure")
    assert not decision.should_retry


def test_permanent_is_reported_before_exhaustion() -> None:
    """When both apply, the reason is the permanent failure."""
    decision = policy().decide(attempts=8, created_at=NOW, now=NOW, permanent=True)

    assert decision.reason == "permanent failure"


def test_attempts_exhausted_gives_up() -> None:
    """The max_attempts-th failed attempt gives up, naming the limit."""
    p = policy()

    last = p.decide(attempts=8, created_at=NOW, now=NOW, permanent=False)
    before = p.decide(attempts=7, created_at=NOW, now=NOW, permanent=False)

    assert last == RetryDecision.give_up("attempts exhausted (8)")
    assert before.should_retry


def test_single_attempt_policy_never_retries() -> None:
    """max_attempts=1 gives up after the first failure."""
    decision = policy(max_attempts=1).decide(attempts=1, created_at=NOW, now=NOW, permanent=False)

    assert decision.reason == "attempts exhausted (1)"


def test_max_age_exceeded_gives_up() -> None:
    """A delivery older than max_age gives up even with attempts left."""
    created = NOW - timedelta(days=2)

    decision = policy().decide(attempts=1, created_at=created, now=NOW, permanent=False)

    assert decision == RetryDecision.give_up("max age exceeded")


def test_retry_is_not_scheduled_past_max_age() -> None:
    """A retry that would fall after the max-age deadline is brought forward to it."""
    created = NOW - timedelta(days=2) + timedelta(seconds=10)

    decision = policy(ALMOST_ONE).decide(attempts=5, created_at=created, now=NOW, permanent=False)

    assert decision == RetryDecision.retry_after(timedelta(seconds=10))


def test_no_max_age_never_expires() -> None:
    """max_age=None lets a delivery of any age retry."""
    created = NOW - timedelta(days=3650)

    decision = policy(max_age=None).decide(attempts=1, created_at=created, now=NOW, permanent=False)

    assert decision.should_retry


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -1},
        {"max_attempts": True},
        {"max_attempts": 2.5},
        {"base_delay": timedelta(seconds=-1)},
        {"max_delay": timedelta(seconds=-1)},
        {"base_delay": timedelta(minutes=5), "max_delay": timedelta(minutes=1)},
        {"base_delay": 30},
        {"max_age": timedelta(0)},
        {"max_age": timedelta(days=-1)},
        {"rng": 0.5},
    ],
    ids=lambda kwargs: ",".join(f"{k}={v!r}" for k, v in kwargs.items()),
)
def test_invalid_arguments_raise_value_error(kwargs: dict[str, object]) -> None:
    """Out-of-range or mistyped arguments raise ValueError."""
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("attempt", [0, -5])
def test_attempt_below_one_is_rejected(attempt: int) -> None:
    """delay() and decide() need at least one attempt."""
    with pytest.raises(ValueError):
        policy().delay(attempt)
    with pytest.raises(ValueError):
        policy().decide(attempts=attempt, created_at=NOW, now=NOW, permanent=False)


def test_rng_is_left_out_of_equality_and_repr() -> None:
    """Two policies differing only in rng are equal, and repr does not show the rng."""
    assert policy(0.1) == policy(0.9)
    assert "rng" not in repr(policy())


def test_policy_is_immutable() -> None:
    """A RetryPolicy cannot be changed after construction."""
    p = RetryPolicy()

    with pytest.raises(AttributeError):
        p.max_attempts = 3  # type: ignore[misc]


def test_server_pause_counts_simultaneous_failures_once() -> None:
    """Sends failing together during one outage lengthen the pause by one step, not four."""
    import time

    from mailoutbox.delivery import ServerPause

    pause = ServerPause(initial=0.05, ceiling=10.0, rng=lambda: 0.5)
    first = [pause.trip() for _ in range(4)]
    assert all(0 < p <= 0.05 for p in first)
    time.sleep(0.06)
    assert pause.remaining() == 0
    assert 0.05 < pause.trip() <= 0.1
    pause.reset()
    assert pause.remaining() == 0
    assert pause.trip() <= 0.05


def test_loop_backoff_grows_while_failures_follow_each_other_and_restarts_after_progress() -> None:
    """An outage waits 0.5, 1, 2 ... 30 s; a failure after a recorded batch waits 0.5 s again."""
    import sqlalchemy as sa

    from mailoutbox.delivery import LoopBackoff

    down = sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))
    backoff = LoopBackoff()
    waits = [backoff.failed(down) for _ in range(8)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    backoff.progressed()
    assert backoff.failed(down) == 0.5
    assert backoff.failed(down) == 1.0


def test_loop_backoff_names_a_schema_mismatch_as_work_for_the_operator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A missing column (the package upgraded, `mailoutbox migrate` not run) is not an
    outage that passes by itself: the log line says what to run, at ERROR."""
    import psycopg
    import sqlalchemy as sa

    from mailoutbox.delivery import LoopBackoff

    missing = psycopg.errors.UndefinedColumn(
        "column mail_deliveries.last_attempt_no does not exist"
    )
    down = psycopg.OperationalError("connection refused")
    backoff = LoopBackoff()
    with caplog.at_level(logging.WARNING, logger="mailoutbox.delivery"):
        backoff.failed(sa.exc.ProgrammingError("SELECT", {}, missing))
        backoff.failed(sa.exc.OperationalError("SELECT", {}, down))
    [mismatch, outage] = caplog.records
    assert mismatch.levelno == logging.ERROR
    assert "mailoutbox migrate" in mismatch.getMessage()
    assert "last_attempt_no does not exist" in mismatch.getMessage()
    assert outage.levelno == logging.WARNING
    assert outage.getMessage().startswith("database unavailable")


def test_a_max_age_meant_as_never_retries_instead_of_overflowing() -> None:
    """`--max-age 3000000d` or timedelta.max, a user's way to say "never give up for age":
    created_at + max_age overflowed the datetime, and the worker dead-lettered the mail
    on its first temporary failure."""
    now = datetime(2026, 12, 3, tzinfo=timezone.utc)
    for max_age in (timedelta.max, timedelta(days=3_000_000)):
        policy = RetryPolicy(max_age=max_age)
        decision = policy.decide(attempts=1, created_at=now, now=now, permanent=False)
        assert decision.action is RetryAction.RETRY
    old = RetryPolicy(max_age=timedelta(days=2))
    aged = old.decide(attempts=1, created_at=now - timedelta(days=3), now=now, permanent=False)
    assert aged.action is RetryAction.GIVE_UP and aged.reason == "max age exceeded"
