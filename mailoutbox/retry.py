"""When to try a failed delivery again, and when to give up.

`RetryPolicy` is pure: the clock (`now`) and the randomness (`rng`) are passed
in, so the worker can use the database clock and tests can pin the jitter.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

_MICROSECOND = timedelta(microseconds=1)


class RetryAction(str, enum.Enum):
    """What a `RetryDecision` asks the worker to do."""

    RETRY = "retry"
    GIVE_UP = "give_up"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class RetryDecision:
    """The verdict on one failed attempt: retry after `delay`, or give up for `reason`."""

    action: RetryAction
    delay: timedelta = timedelta(0)
    reason: str = ""

    @property
    def should_retry(self) -> bool:
        return self.action is RetryAction.RETRY

    @classmethod
    def retry_after(cls, delay: timedelta) -> RetryDecision:
        return cls(RetryAction.RETRY, delay=delay)

    @classmethod
    def give_up(cls, reason: str) -> RetryDecision:
        return cls(RetryAction.GIVE_UP, reason=reason)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped in delay, attempts and age.

    After the n-th failed attempt the next one waits a uniformly random time in
    ``[0, min(max_delay, base_delay * 2**(n-1)))`` ("full jitter": retries of
    many deliveries that failed together, say during a relay outage, spread out
    instead of hammering the relay in waves).

    The defaults suit transactional mail (sign-in links, password resets,
    receipts):

    - ``max_attempts=8``: the first try plus seven retries whose delay ceilings
      are 30 s, 1, 2, 4, 8, 16 and 32 min, about an hour of backoff in the
      worst case (half that on average). That rides out greylisting (which
      usually asks for a retry after 1 to 15 minutes), relay restarts and
      short outages; a failure that outlasts an hour rarely fixes itself, and
      the dead-letter queue (with `resend`) is the better place for it.
    - ``max_delay=1h`` keeps raised attempt counts from producing waits of
      days.
    - ``max_age=2 days``: transactional content goes stale. A delivery whose
      cycle began longer ago than this (a backlog after a worker outage, a
      long chain of retries) is given up rather than sent late; retries are
      never scheduled past that deadline. None disables the age limit.

    ``RetryPolicy(base_delay=timedelta(0), max_delay=timedelta(0))`` retries
    at once. `rng` must return floats in [0, 1) like `random.random`; inject a
    seeded or constant one to make delays reproducible.
    """

    max_attempts: int = 8
    base_delay: timedelta = timedelta(seconds=30)
    max_delay: timedelta = timedelta(hours=1)
    max_age: timedelta | None = timedelta(days=2)
    rng: Callable[[], float] = field(default=random.random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError(f"max_attempts must be an int, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("base_delay", "max_delay"):
            value = getattr(self, name)
            if not isinstance(value, timedelta):
                raise ValueError(f"{name} must be a timedelta, got {value!r}")
            if value < timedelta(0):
                raise ValueError(f"{name} must not be negative, got {value}")
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay ({self.max_delay}) must not be shorter than base_delay "
                f"({self.base_delay})"
            )
        if self.max_age is not None and (
            not isinstance(self.max_age, timedelta) or self.max_age <= timedelta(0)
        ):
            raise ValueError(f"max_age must be a positive timedelta or None, got {self.max_age!r}")
        if not callable(self.rng):
            raise ValueError("rng must be a callable returning a float in [0, 1)")

    def ceiling(self, attempt: int) -> timedelta:
        """The largest delay `delay(attempt)` can return (the exclusive upper bound)."""
        _check_attempts(attempt, "attempt")
        base = self.base_delay // _MICROSECOND
        cap = self.max_delay // _MICROSECOND
        shift = attempt - 1
        # Integer microseconds, and no shift wider than the cap needs: base << shift
        # exceeds cap as soon as shift reaches cap's bit length, so huge attempt
        # numbers never build huge integers or overflow timedelta.
        if base == 0:
            micros = 0
        elif shift >= cap.bit_length():
            micros = cap
        else:
            micros = min(cap, base << shift)
        return timedelta(microseconds=micros)

    def delay(self, attempt: int) -> timedelta:
        """A full-jitter delay after `attempt` attempts (1 after the first failure).

        Uniform in ``[0, min(max_delay, base_delay * 2**(attempt-1)))``,
        rounded to whole microseconds.
        """
        ceiling = self.ceiling(attempt) // _MICROSECOND
        if ceiling == 0:
            return timedelta(0)
        # Clamped so a misbehaving rng cannot produce negative or over-cap delays.
        fraction = min(max(float(self.rng()), 0.0), 1.0)
        return timedelta(microseconds=min(int(fraction * ceiling), ceiling))

    def decide(
        self,
        *,
        attempts: int,
        created_at: datetime,
        now: datetime,
        permanent: bool,
    ) -> RetryDecision:
        """Decide what follows a failed attempt.

        `attempts` counts the attempts made so far in this cycle, the failed one
        included; `created_at` is when the cycle began (the delivery's creation,
        or its last resend); `now` is the current time (the worker passes the
        database clock). Both datetimes must be timezone-aware, or both naive.

        Gives up with reason "permanent failure", "attempts exhausted (N)" or
        "max age exceeded", checked in that order; otherwise retries after
        `delay(attempts)`, shortened so the retry is not due after the
        max-age deadline.
        """
        _check_attempts(attempts, "attempts")
        if permanent:
            return RetryDecision.give_up("permanent failure")
        if attempts >= self.max_attempts:
            return RetryDecision.give_up(f"attempts exhausted ({self.max_attempts})")
        delay = self.delay(attempts)
        if self.max_age is not None:
            # Not created_at + max_age: a max_age meant as "never" (timedelta.max, or
            # the CLI's 3000000d) would overflow the datetime and dead-letter the mail.
            remaining = self.max_age - (now - created_at)
            if remaining <= timedelta(0):
                return RetryDecision.give_up("max age exceeded")
            delay = min(delay, remaining)
        return RetryDecision.retry_after(delay)


def _check_attempts(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
