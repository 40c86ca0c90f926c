"""Wake workers after the outbox's own enqueues commit: one NOTIFY for many.

PostgreSQL lets one transaction that has called NOTIFY commit at a time: it
holds the notification queue's lock from before its commit record is written
until that record is flushed. Enqueues that each notify in their own
transaction cannot share a WAL flush, so threads enqueuing at once wait for
each other's disk writes (benchmarks/README.md measures it).

So when an Outbox enqueues in its own transaction while another of its
enqueues is in flight in this process, the statement sets
`mailoutbox.notify_after_commit` for its transaction, the enqueue trigger stays
quiet (migration 0002), and once the enqueue has committed the Outbox asks its
AfterCommitNotifier for a NOTIFY. The notifier sends it from a thread of its
own, one NOTIFY for every enqueue that committed while it sent the last one. A
lone enqueue (one request, one mail), every enqueue in a host's transaction
(`connection=`) and the AsyncOutbox's enqueues notify at their commit as before.

A NOTIFY still follows the commit it announces, so a woken worker finds the
mail. If it cannot be sent (the database went away right after the commit),
workers find the mail at their next poll (`poll_interval`). At interpreter
exit a pending NOTIFY is sent before the process ends (waiting a second at
most), so a script that enqueues and exits does not leave its mail to the poll.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator

from .errors import driver_error, first_line

log = logging.getLogger(__name__)

# An idle sender thread ends after this long; the next wake() starts another.
IDLE_SECONDS = 10.0
EXIT_FLUSH_SECONDS = 1.0


class AfterCommitNotifier:
    """Counts an Outbox's enqueues in flight and sends the NOTIFYs they defer.

    `send` sends one NOTIFY in a transaction of its own (committed on return).
    """

    def __init__(self, send: Callable[[], None]) -> None:
        self._send = send
        self._reset()
        _live.add(self)

    def _reset(self) -> None:
        # Also the state of a forked child: no thread, nothing owed by the parent.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._in_flight = 0
        self._requested = 0  # wake() calls so far
        self._covered = 0  # wake() calls a finished send started after
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def enqueuing(self) -> Iterator[bool]:
        """Around an enqueue in the outbox's own transaction.

        Yields whether it should notify after commit (another enqueue is in
        flight); the caller then calls wake() once it has committed.
        """
        with self._lock:
            after_commit = self._in_flight > 0
            self._in_flight += 1
        try:
            yield after_commit
        finally:
            with self._lock:
                self._in_flight -= 1

    def wake(self) -> None:
        """Have a NOTIFY sent that starts after this call (so after the caller's commit)."""
        with self._changed:
            self._requested += 1
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="mailoutbox-notify", daemon=True
                )
                self._thread.start()
            self._changed.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every wake() so far is covered by a sent NOTIFY; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._covered >= self._requested, timeout)

    def _serve(self) -> None:
        while True:
            with self._changed:
                if not self._changed.wait_for(
                    lambda: self._requested > self._covered, IDLE_SECONDS
                ):
                    self._thread = None
                    return
                # Every wake() counted here was called before this send starts.
                target = self._requested
            try:
                self._send()
            except Exception as exc:
                # A database error is one line, in the host application's log; anything
                # else is a bug and keeps its traceback.
                log.warning(
                    "could not notify workers of new mail (%s); they will find it at their next"
                    " poll",
                    first_line(exc),
                    exc_info=driver_error(exc) is None,
                )
            with self._changed:
                self._covered = target
                self._changed.notify_all()


_live: weakref.WeakSet[AfterCommitNotifier] = weakref.WeakSet()


def _flush_all() -> None:
    deadline = time.monotonic() + EXIT_FLUSH_SECONDS
    for notifier in list(_live):
        notifier.flush(max(0.0, deadline - time.monotonic()))


def _reset_all_in_child() -> None:
    for notifier in list(_live):
        notifier._reset()


atexit.register(_flush_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_all_in_child)
