"""What happens to one claimed delivery: the decisions around a send, without I/O.

Both workers (worker.py, and the async one in aio.py) run a claimed delivery
through the same three steps: `before_send` (checks that need no send, then
render), the transport's send (the only I/O, theirs), and `after_send` or
`after_failure`, which turn the outcome into a Completion the store applies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

import sqlalchemy as sa

from .errors import (
    SendError,
    ServerUnavailable,
    TransientSendError,
    UnknownSendOutcome,
    driver_error,
    first_line,
)
from .logs import redact_addresses
from .records import AttemptRecord, ClaimedDelivery, Completion
from .render import check_message_id_domain, envelope_key, render
from .retry import RetryDecision, RetryPolicy
from .schema import Outcome, Status
from .transports.base import Envelope, SendResult

log = logging.getLogger(__name__)

MAX_ERROR_TEXT = 2000
EXPIRED_REASON = "expired"
# A tick claims no further batch once it has put this many deliveries back for retry
# (WorkerSettings.claims_again_in_tick).
RETRIED_PER_TICK = 1000


def may_start_a_send(lease_ends: float, lease_seconds: float) -> bool:
    """Whether a batch's lease leaves room to begin one more send: half of it, at least.

    One lease covers a whole batch, and every send must end within it: past it,
    another worker takes the delivery over and sends it too. A relay slow enough
    (content scanning, tarpitting) makes a batch's sends outlast the lease
    however long each one's timeout is. The README asks for a lease well beyond
    the longest send; half the lease is that margin. A delivery refused here is
    handed back unsent, its attempt refunded, due at once.
    """
    return lease_ends - time.monotonic() >= lease_seconds / 2


def bounded(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """Error text the database can store, cut to `limit` characters so rows and logs stay bounded.

    Transports write these texts, and PostgreSQL refuses NUL and lone surrogates
    (text decoded with surrogateescape, as os.fsdecode does) in text: one such
    text used to fail the record of its whole batch, whose mails were then all
    sent again.
    """
    if "\x00" in text or not text.isascii():
        text = text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 15] + "... [truncated]"


def describe(exc: BaseException) -> str:
    """An exception's text for the attempt row, or its class name when it has none.

    Guarded: an exception whose __str__ fails must still be recorded, as a
    failure, with the rest of its batch.
    """
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - any failure of a foreign __str__
        text = ""
    return text or type(exc).__name__


def refusals(result: object) -> dict[str, list[Any]] | None:
    """The attempt's `refused` record, {address: [code, text]}, from what a send returned.

    A SendResult's `refused`, or a mapping of the same shape as smtplib's
    sendmail() returns it (texts as bytes). Anything else returned is warned
    about and recorded as a send without refusals. The send has happened: nothing
    in its report may keep it from being recorded as sent (it used to dead-letter
    the mail, and a resend then delivered it twice).
    """
    refused = result.refused if isinstance(result, SendResult) else result
    if not refused:
        return None
    if not isinstance(refused, Mapping):
        log.warning(
            "the transport's send returned a %s, not a SendResult or None: recorded as sent",
            type(result).__name__,
        )
        return None
    return {bounded(str(address), 500): _refusal(reply) for address, reply in refused.items()}


def _refusal(reply: Any) -> list[Any]:
    try:
        code, text = reply
    except (TypeError, ValueError):
        code, text = None, reply
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return [code if isinstance(code, int) else None, bounded(str(text), 500)]


def _for_now(code: object) -> bool:
    """Whether a recipient refused with `code` may be accepted later (a 4xx)."""
    return isinstance(code, int) and 400 <= code < 500


def refused_for_now(
    refused: Mapping[str, list[Any]], recipients: Sequence[str]
) -> dict[str, list[Any]]:
    """The envelope `recipients` that `refused` holds with a 4xx reply (the server
    may take them later), each with its reply, in envelope order.

    A refusal is matched to its recipient as the envelope spells it (the domain's
    case ignored, as everywhere), else with all case ignored: a transport may
    report addresses normalised. A refusal without a code, or naming no recipient
    of the envelope, is not one of them.
    """
    temporary = {address: reply for address, reply in refused.items() if _for_now(reply[0])}
    if not temporary:
        return {}
    exact = {envelope_key(address): reply for address, reply in temporary.items()}
    keys = {envelope_key(address) for address in recipients}
    folded = {a.lower(): reply for a, reply in temporary.items() if envelope_key(a) not in keys}
    found = {}
    for address in recipients:
        reply = exact.get(envelope_key(address)) or folded.get(address.lower())
        if reply is not None:
            found[address] = reply
    return found


def awaitable_returned(result: object) -> ServerUnavailable:
    """What a sync worker makes of a send that returned an awaitable: nothing was sent.

    A coroutine transport behind a sync wrapper (an `async def send` is refused
    when the Worker is made). Taken as the server being unavailable: the
    delivery goes back without an attempt charged and the worker pauses, with
    an error in the log, until the operator runs it under AsyncWorker.
    """
    close = getattr(result, "close", None)
    if callable(close):
        close()  # a coroutine never awaited warns when collected
    text = "the transport's send returned an awaitable: a coroutine transport needs AsyncWorker"
    log.error(text)
    return ServerUnavailable(None, text)


def classify(exc: BaseException) -> tuple[bool, Outcome]:
    """(permanent?, outcome) of an exception raised by a transport's send.

    Network errors are transient whatever transport raised them; anything the
    transport did not classify is permanent, so a bug cannot loop forever.
    """
    if isinstance(exc, UnknownSendOutcome):
        return False, Outcome.UNKNOWN
    if isinstance(exc, TransientSendError | ConnectionError | TimeoutError):
        return False, Outcome.TRANSIENT_FAILURE
    # PermanentSendError, and whatever else a transport raised.
    return True, Outcome.PERMANENT_FAILURE


@dataclass(frozen=True)
class TickReport:
    """What one `tick()` did.

    `claimed` counts leases taken; each ends as `sent`, `retried`,
    `dead_lettered`, `released` (handed back unsent because the worker was
    stopping) or `lost` (the lease was taken over before completion, so the
    outcome was not recorded). `taken_over` counts the claimed deliveries whose
    previous lease had run out (its worker died or hung): the claim recorded a
    `lease_expired` attempt for each.
    """

    claimed: int = 0
    sent: int = 0
    retried: int = 0
    dead_lettered: int = 0
    released: int = 0
    lost: int = 0
    taken_over: int = 0

    def __add__(self, other: TickReport) -> TickReport:
        return TickReport(
            *(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__)
        )

    @classmethod
    def of_batch(
        cls,
        claimed: Sequence[ClaimedDelivery],
        completions: Sequence[Completion],
        completed: Set[uuid.UUID],
        released: int,
    ) -> TickReport:
        applied = [c.status for c in completions if c.delivery_id in completed]
        return cls(
            claimed=len(claimed),
            taken_over=sum(c.previous_status is Status.SENDING for c in claimed),
            sent=applied.count(Status.SENT),
            retried=applied.count(Status.RETRYING),
            dead_lettered=applied.count(Status.DEAD_LETTERED),
            released=released,
            lost=len(completions) - len(applied),
        )


@dataclass(frozen=True)
class DeliveryRules:
    """The per-delivery decisions, configured once per worker."""

    retry: RetryPolicy
    worker: str
    message_id_domain: str | None = None

    def before_send(self, claimed: ClaimedDelivery) -> Completion | Envelope:
        """A Completion if the delivery must not be sent, else the Envelope to send."""
        if claimed.attempts > self.retry.max_attempts:
            # Only reachable through a lost lease on the last attempt (each attempt is
            # counted when claimed); the earlier ones may have failed in any way.
            return self.complete(
                claimed,
                Status.DEAD_LETTERED,
                None,
                reason=f"attempts exhausted ({self.retry.max_attempts}): "
                "the worker holding the last one was lost (see the attempts for the others)",
            )
        if claimed.expires_at is not None and claimed.claimed_at >= claimed.expires_at:
            # Settled recipients have it: an earlier attempt sent it to them.
            rest = " to the rest of its recipients" if claimed.settled_recipients else ""
            attempt = AttemptRecord(Outcome.EXPIRED, error=f"expired before it could be sent{rest}")
            return self.complete(claimed, Status.DEAD_LETTERED, attempt, reason=EXPIRED_REASON)
        started = time.monotonic()
        try:
            envelope = render(
                claimed.delivery_id,
                claimed.payload,
                claimed.recipients,
                # The Date header comes from the database clock, like every other time.
                date=claimed.claimed_at,
                message_id_domain=self.message_id_domain,
            )
        except Exception as exc:  # noqa: BLE001 - a message that cannot render is permanent
            return self.after_failure(
                claimed, started, exc, permanent=True, prefix="render failed: "
            )
        if claimed.settled_recipients:
            return self._to_the_unsettled(claimed, envelope)
        return envelope

    def _to_the_unsettled(
        self, claimed: ClaimedDelivery, envelope: Envelope
    ) -> Completion | Envelope:
        """The envelope narrowed to the recipients no earlier attempt settled.

        The message is the same (its To and Cc list everyone, and the Message-ID
        is the delivery's), so each recipient gets one copy of one message.
        """
        settled = {envelope_key(address) for address in claimed.settled_recipients}
        waiting = tuple(a for a in envelope.recipients if envelope_key(a) not in settled)
        if not waiting:
            # The worker never settles every recipient (one refused for now is why a
            # mail is retried), but no path may send a mail to nobody.
            attempt = AttemptRecord(
                Outcome.SENT, error="every recipient was settled by an earlier attempt"
            )
            return self.complete(claimed, Status.SENT, attempt)
        return dataclasses.replace(envelope, recipients=waiting)

    def after_send(
        self,
        claimed: ClaimedDelivery,
        started: float,
        result: SendResult | None,
        envelope: Envelope | None = None,
    ) -> Completion:
        """The Completion of a send that succeeded, possibly refusing some recipients.

        Recipients refused for good (5xx) are recorded and the delivery is sent. If
        some of `envelope`'s recipients were refused for now (4xx), the delivery is
        retried for them alone (see `_after_partial`).
        """
        refused = refusals(result)
        duration = time.monotonic() - started
        if refused and envelope is not None:
            for_now = refused_for_now(refused, envelope.recipients)
            if for_now:
                return self._after_partial(claimed, duration, envelope, refused, for_now)
        attempt = AttemptRecord(Outcome.SENT, duration_seconds=duration, refused=refused)
        if attempt.refused:
            # The delivery is `sent`, so nothing else says that some recipients never
            # got it. Codes only: INFO never shows an address.
            log.info(
                "delivery %s sent; %d recipient(s) refused (%s)",
                claimed.delivery_id,
                len(attempt.refused),
                ", ".join(sorted({str(code) for code, _ in attempt.refused.values()})),
                extra={"delivery_id": str(claimed.delivery_id), "outcome": "sent"},
            )
        if log.isEnabledFor(logging.DEBUG):
            # Guarded: building the record's fields cost more than the check, per mail.
            log.debug(
                "sent delivery %s",
                claimed.delivery_id,
                extra={
                    "delivery_id": str(claimed.delivery_id),
                    "attempt": claimed.attempts,
                    "outcome": "sent",
                },
            )
        return self.complete(claimed, Status.SENT, attempt)

    def _after_partial(
        self,
        claimed: ClaimedDelivery,
        duration: float,
        envelope: Envelope,
        refused: dict[str, list[Any]],
        for_now: dict[str, list[Any]],
    ) -> Completion:
        """Sent to some recipients while others were refused for now: retry for those.

        A retry of the whole mail would reach the accepted recipients twice, and
        recording it as sent left the others without it (a greylisted cc; a 451
        in a transaction after a 452). So the attempt is recorded as sent, with
        its refusals, and the delivery is retried by the policy, as for any
        transient failure, with every other recipient of this envelope settled:
        the next attempts send the same message to the rest only. If the policy
        gives up, the mail is dead-lettered: the dead-letter list is where mail
        that did not reach everyone is seen, and a resend goes to the rest only.
        """
        code, text = next(iter(for_now.values()))
        summary = bounded(
            f"{len(for_now)} of {len(envelope.recipients)} recipient(s) refused for now; "
            f"first: {code} {text}"
        )
        attempt = AttemptRecord(
            Outcome.SENT,
            duration_seconds=duration,
            error=summary,
            smtp_code=code,
            refused=refused,
        )
        decision = self._decide(claimed, duration, permanent=False)
        log.info(
            "delivery %s attempt %d sent; %d recipient(s) refused for now (%s), %s",
            claimed.delivery_id,
            claimed.attempts,
            len(for_now),
            ", ".join(sorted({str(reply[0]) for reply in for_now.values()})),
            "retried alone" if decision.should_retry else decision.reason,
            extra={
                "delivery_id": str(claimed.delivery_id),
                "attempt": claimed.attempts,
                "outcome": "sent",
                "smtp_code": code,
            },
        )
        settled = tuple(address for address in envelope.recipients if address not in for_now)
        return self._as_decided(claimed, decision, attempt, summary, settled)

    def after_failure(
        self,
        claimed: ClaimedDelivery,
        started: float,
        exc: BaseException,
        *,
        permanent: bool | None = None,
        prefix: str = "",
    ) -> Completion:
        """The Completion of a failed attempt: retry by the policy, or dead-letter.

        `permanent` overrides the classification of `exc` (see `classify`). A
        mail whose recipients left were all refused for good, while the settled
        ones have it from an earlier attempt, is sent: it reached everyone it
        could, as when a first attempt refuses some recipients beside accepted
        ones. Dead-lettered, it was a false alarm that every resend repeated.
        If some of them were refused for now instead, the mail is retried for
        those alone: the ones refused for good are settled too. (Before anyone
        has the mail, nothing is settled: a mail whose recipients are all
        settled must have reached one of them.)
        """
        elapsed = time.monotonic() - started
        classified_permanent, outcome = classify(exc)
        if permanent is None:
            permanent = classified_permanent
        code = exc.code if isinstance(exc, SendError) else None
        text = bounded(prefix + describe(exc))
        refused = refusals(exc.refused) if isinstance(exc, SendError) else None
        attempt = AttemptRecord(
            outcome,
            duration_seconds=elapsed,
            error=text,
            error_class=type(exc).__name__,
            smtp_code=code,
            smtp_enhanced_code=exc.enhanced_code if isinstance(exc, SendError) else None,
            refused=refused,
        )
        reached_the_rest = permanent and refused is not None and bool(claimed.settled_recipients)
        decision = self._decide(claimed, elapsed, permanent=permanent)
        log.info(
            "delivery %s attempt %d failed (%s): %s%s",
            claimed.delivery_id,
            claimed.attempts,
            outcome.value,
            # Servers quote recipients in their replies; INFO never shows an address.
            redact_addresses(text),
            "; sent, an earlier attempt reached the others" if reached_the_rest else "",
            extra={
                "delivery_id": str(claimed.delivery_id),
                "attempt": claimed.attempts,
                "outcome": outcome.value,
                "smtp_code": code,
            },
        )
        if reached_the_rest:
            return self.complete(claimed, Status.SENT, attempt)
        settled: tuple[str, ...] = ()
        if refused and claimed.settled_recipients:
            settled = tuple(a for a, (code, _) in refused.items() if not _for_now(code))
        return self._as_decided(claimed, decision, attempt, text, settled)

    def _decide(
        self, claimed: ClaimedDelivery, elapsed: float, *, permanent: bool
    ) -> RetryDecision:
        return self.retry.decide(
            attempts=claimed.attempts,
            created_at=claimed.cycle_started_at,
            now=claimed.claimed_at + timedelta(seconds=elapsed),
            permanent=permanent,
        )

    def _as_decided(
        self,
        claimed: ClaimedDelivery,
        decision: RetryDecision,
        attempt: AttemptRecord,
        text: str,
        settled: tuple[str, ...] = (),
    ) -> Completion:
        """Retrying after the decision's delay, or dead-lettered with its reason."""
        if decision.should_retry:
            return self.complete(
                claimed,
                Status.RETRYING,
                attempt,
                reason=text,
                retry_delay=decision.delay.total_seconds(),
                settled=settled,
            )
        return self.complete(
            claimed,
            Status.DEAD_LETTERED,
            attempt,
            reason=bounded(f"{decision.reason}: {text}"),
            settled=settled,
        )

    def after_unavailable(
        self, claimed: ClaimedDelivery, started: float, exc: ServerUnavailable, pause: float
    ) -> Completion:
        """The server gave no session: try again after the pause, charging no attempt.

        The attempt row still records what happened; only max_age still applies,
        so an outage longer than the retry budget dead-letters nothing.
        """
        elapsed = time.monotonic() - started
        text = bounded(describe(exc))
        attempt = AttemptRecord(
            Outcome.TRANSIENT_FAILURE,
            duration_seconds=elapsed,
            error=text,
            error_class=type(exc).__name__,
            smtp_code=exc.code,
            smtp_enhanced_code=exc.enhanced_code,
        )
        now = claimed.claimed_at + timedelta(seconds=elapsed)
        max_age = self.retry.max_age
        # A difference, not cycle_started_at + max_age: a max_age meant as "never"
        # (timedelta.max) would overflow the datetime (as in RetryPolicy.decide).
        if max_age is not None and now - claimed.cycle_started_at >= max_age:
            return self.complete(
                claimed, Status.DEAD_LETTERED, attempt, reason=bounded(f"max age exceeded: {text}")
            )
        return self.complete(
            claimed, Status.RETRYING, attempt, reason=text, retry_delay=pause, refund=True
        )

    def complete(
        self,
        claimed: ClaimedDelivery,
        status: Status,
        attempt: AttemptRecord | None,
        *,
        reason: str = "",
        retry_delay: float = 0.0,
        refund: bool = False,
        settled: tuple[str, ...] = (),
    ) -> Completion:
        return Completion(
            delivery_id=claimed.delivery_id,
            claim_token=claimed.claim_token,
            status=status,
            attempt=attempt,
            retry_delay_seconds=retry_delay,
            reason=reason,
            worker=self.worker,
            refund_attempt=refund,
            settled_recipients=settled,
        )


class WorkerObserver(Protocol):
    """Told about every completed batch (metrics live behind this; see metrics.py).

    Called on the worker's thread after the batch's completion committed;
    `completions` includes those that were fenced off (counted in report.lost).
    It must not raise; an exception is logged and ignored.
    """

    def on_batch(self, report: TickReport, completions: Sequence[Completion]) -> None: ...


class SentBatch:
    """A claimed batch whose sends are over, waiting to be recorded (both workers)."""

    def __init__(
        self,
        claimed: Sequence[ClaimedDelivery],
        outcomes: Sequence[Completion | None],
        lease_ends: float,
    ) -> None:
        self.claimed = claimed
        self.lease_ends = lease_ends
        # None: the worker stopped or paused before that send, or the lease ran
        # short (may_start_a_send); its lease goes back.
        self.completions = [o for o in outcomes if o is not None]
        self.unsent = [c for c, o in zip(claimed, outcomes, strict=True) if o is None]

    def retried_ids(self) -> list[uuid.UUID]:
        """Deliveries this batch puts back to retrying: not to be claimed again this tick."""
        return [c.delivery_id for c in self.completions if c.status is Status.RETRYING]

    def put_back_ids(self) -> list[uuid.UUID]:
        """Deliveries this batch leaves due again (retried, or handed back unsent):
        not to be claimed again this tick."""
        return self.retried_ids() + [c.delivery_id for c in self.unsent]

    def warn_if_the_lease_ran_short(self, lease_seconds: float, worker: str) -> None:
        """Say so when sends were handed back because half the lease had gone by
        (not because the worker was stopping or paused): a setting to change."""
        if self.unsent and not may_start_a_send(self.lease_ends, lease_seconds):
            log.warning(
                "%d deliveries handed back unsent: half of the batch's %.0f s lease went"
                " by before their sends could begin; lengthen the lease or lower the"
                " batch size (or raise the concurrency)",
                len(self.unsent),
                lease_seconds,
                extra={"worker": worker},
            )

    @property
    def records_in_one_statement(self) -> bool:
        """Whether recording the batch is the completion statement alone (nothing to hand back).

        Then the workers run it in autocommit: atomic on its own, and one round
        trip instead of three (BEGIN, statement, COMMIT).
        """
        return not self.unsent

    def releases(self) -> Iterator[tuple[uuid.UUID, list[uuid.UUID]]]:
        """(claim token, ids) of the leases to hand back unsent."""
        for token, group in by_claim_token(self.unsent):
            yield token, [c.delivery_id for c in group]

    def finish(
        self,
        worker: str,
        observer: WorkerObserver | None,
        completed: Set[uuid.UUID],
        released: int,
    ) -> TickReport:
        """Report the batch once its record is committed (log, observer)."""
        report = TickReport.of_batch(self.claimed, self.completions, completed, released)
        if report.lost:
            log.warning(
                "%d completions were fenced off: their leases had been taken over",
                report.lost,
                extra={"worker": worker},
            )
        log.info(
            "batch done: %d claimed, %d sent, %d retrying, %d dead-lettered",
            report.claimed,
            report.sent,
            report.retried,
            report.dead_lettered,
            extra={"worker": worker},
        )
        if observer is not None:
            try:
                observer.on_batch(report, self.completions)
            except Exception:  # observing must never break delivering
                log.exception("worker observer failed")
        return report


def by_claim_token(
    claimed: Sequence[ClaimedDelivery],
) -> Iterator[tuple[uuid.UUID, list[ClaimedDelivery]]]:
    groups: dict[uuid.UUID, list[ClaimedDelivery]] = {}
    for c in claimed:
        groups.setdefault(c.claim_token, []).append(c)
    yield from groups.items()


def check_worker_settings(
    batch_size: int, concurrency: int, lease: timedelta, poll_interval: timedelta
) -> None:
    """Refuse settings no worker can run with (ValueError)."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if lease <= timedelta(0):
        raise ValueError("lease must be positive")
    if poll_interval <= timedelta(0):
        raise ValueError("poll_interval must be positive")


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ServerPause:
    """After ServerUnavailable, a worker stops sending for a while, and longer each time.

    The pause starts at `initial` seconds and doubles up to `ceiling` (with
    +-20% jitter so workers do not probe in step); any successful send ends
    it. Shared by a worker's send threads.
    """

    def __init__(
        self, initial: float = 1.0, ceiling: float = 60.0, rng: Any = random.random
    ) -> None:
        self.initial = initial
        self.ceiling = ceiling
        self._rng = rng
        self._lock = threading.Lock()
        self._failures = 0
        self._until = 0.0

    def remaining(self) -> float:
        """Seconds left in the current pause (0 when not paused)."""
        return max(0.0, self._until - time.monotonic())

    def trip(self) -> float:
        """Record an unavailable server; answer the seconds until the pause ends."""
        with self._lock:
            now = time.monotonic()
            if now < self._until:
                # Sends that were in flight together fail together: one outage, one step.
                return self._until - now
            self._failures += 1
            ceiling = min(self.ceiling, self.initial * 2 ** min(self._failures - 1, 30))
            delay = ceiling * (0.8 + 0.4 * float(self._rng()))
            self._until = max(self._until, time.monotonic() + delay)
            log.warning(
                "mail server unavailable: pausing sends for %.1fs (failure %d)",
                self._until - time.monotonic(),
                self._failures,
            )
            return self._until - time.monotonic()

    def reset(self) -> None:
        if self._failures:
            with self._lock:
                self._failures = 0
                self._until = 0.0


class WorkerSettings:
    """What Worker and AsyncWorker share: the knobs, validated, and the delivery rules."""

    def __init__(
        self,
        transport: Any,
        *,
        retry: RetryPolicy | None = None,
        batch_size: int = 100,
        concurrency: int = 8,
        lease: timedelta = timedelta(minutes=5),
        poll_interval: timedelta = timedelta(seconds=5),
        listen: bool = True,
        name: str | None = None,
        message_id_domain: str | None = None,
        observer: WorkerObserver | None = None,
    ) -> None:
        check_worker_settings(batch_size, concurrency, lease, poll_interval)
        if message_id_domain is not None:
            # Found here, at start-up: at render time it dead-letters every mail.
            check_message_id_domain(message_id_domain)
        self.transport = transport
        self.retry = retry or RetryPolicy()
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.lease = lease
        self.poll_interval = poll_interval
        self.listen = listen
        self.name = name or default_worker_name()
        self.message_id_domain = message_id_domain
        self.observer = observer
        self.rules = DeliveryRules(self.retry, self.name, message_id_domain)
        self.pause = ServerPause()
        self.loop_backoff = LoopBackoff()

    def more_may_be_due(self, claimed: Sequence[ClaimedDelivery]) -> bool:
        """Whether a claim that answered `claimed` may have left due rows behind.

        A full batch may have; so may a row whose lease expired, which a claim
        takes alone (statements.claim_due) whatever else is due.
        """
        return len(claimed) == self.batch_size or (
            len(claimed) == 1 and claimed[0].previous_status is Status.SENDING
        )

    def claims_again_in_tick(self, claimed: Sequence[ClaimedDelivery], retried: int) -> bool:
        """Whether a tick that just claimed `claimed` claims again, `retried` retries so far.

        Only if more may be due, and only until the tick has put RETRIED_PER_TICK
        deliveries back for retry. Every claim of a tick carries the ids the tick
        retried, so that none is claimed twice in one tick, and the server compares
        each candidate row with all of them. Against a relay that defers everything
        (throttling, greylisting) over a backlog that list grew by a batch each time:
        a tick over 60,000 such mails took 44 s where 20,000 took 7. Ending the tick
        there keeps every claim short; run() ticks again at once, a host's
        scheduler at its next call.
        """
        return retried < RETRIED_PER_TICK and self.more_may_be_due(claimed)

    def outcome_of_send(
        self,
        claimed: ClaimedDelivery,
        started: float,
        result: SendResult | None = None,
        exc: BaseException | None = None,
        envelope: Envelope | None = None,
    ) -> Completion:
        """The Completion of a send of `envelope` that returned `result` or raised `exc`."""
        if exc is None:
            self.pause.reset()
            return self.rules.after_send(claimed, started, result, envelope)
        if isinstance(exc, ServerUnavailable):
            return self.rules.after_unavailable(claimed, started, exc, self.pause.trip())
        return self.rules.after_failure(claimed, started, exc)


class LoopBackoff:
    """How long a worker's loop waits after a failure before it tries again.

    Doubles from 0.5 s up to 30 s while failures follow one another, so that a
    database that is down is not hammered; starts from 0.5 s again once the
    worker has got something done since (a batch recorded, a tick ended). A
    failure after progress is a blip, not an outage: otherwise a tick that
    drains a backlog for hours would carry its wait from one passing failure to
    the next until each of them cost 30 s.

    A database error is logged as one line, the first of its driver's message:
    its str() carries the statement and its parameters, which would put
    kilobytes of SQL, and recipient addresses, in every log line.
    """

    FIRST = 0.5
    LONGEST = 30.0

    def __init__(self) -> None:
        self._wait = 0.0

    def progressed(self) -> None:
        """The worker got something done: the next failure waits the shortest time."""
        self._wait = 0.0

    def failed(self, exc: Exception) -> float:
        """Log the loop's failure; answer the seconds to wait before the next try."""
        self._wait = min(self.LONGEST, max(self.FIRST, self._wait * 2))
        driver = driver_error(exc)
        if driver is not None and str(getattr(driver, "sqlstate", "")).startswith("42"):
            # A missing column or table, or no privilege: not an outage that passes
            # by itself, and the operator has something to do. Retried all the same,
            # so a worker that starts before its deploy's migration picks up after it.
            log.error(
                "the outbox tables do not match this mailoutbox (%s: %s): run"
                " `mailoutbox migrate`, or grant the worker's role its privileges;"
                " retry in %.1fs",
                type(driver).__name__,
                redact_addresses(first_line(driver)),
                self._wait,
            )
        elif driver is not None:
            log.warning(
                "database unavailable (%s: %s); retry in %.1fs",
                type(driver).__name__,
                redact_addresses(first_line(driver)),
                self._wait,
            )
        else:
            log.exception("worker loop failed; retry in %.1fs", self._wait)
        return self._wait


def completion_retry_delays(lease_ends: float) -> Iterator[float | None]:
    """Waits between tries of a batch's completion; None marks the last try.

    Doubles from 0.2 s to 5 s, and stops a second before `lease_ends` (a
    time.monotonic() value): past it another worker may own the deliveries,
    and the fenced completion would change nothing anyway.
    """
    delay = 0.2
    now = time.monotonic()
    while True:
        if now + delay >= lease_ends - 1.0:
            yield None
            return
        yield delay
        # The caller waited `delay` (or longer) before asking for the next one.
        now = max(time.monotonic(), now + delay)
        delay = min(5.0, delay * 2)


def log_completion_retry(exc: sa.exc.DBAPIError, delay: float) -> None:
    log.warning(
        "could not record a batch's outcome (%s); retrying in %.1fs",
        redact_addresses(str(exc.orig).strip()),
        delay,
    )
