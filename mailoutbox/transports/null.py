"""A transport that accepts and discards every message, for benchmarks."""

from __future__ import annotations

import threading

from .base import Envelope, SendResult


class NullTransport:
    """Accepts every message and throws it away, counting them in `count`.

    It measures the outbox itself (claim, complete, bookkeeping) without a mail
    server in the way. Safe to use from many threads at once.
    """

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """How many messages were sent (and discarded) so far."""
        with self._lock:
            return self._count

    def send(self, envelope: Envelope) -> SendResult | None:
        """Discard the message."""
        with self._lock:
            self._count += 1
        return None

    def close(self) -> None:
        """Nothing to release; present so every transport can be closed alike."""

    def __repr__(self) -> str:
        return f"<NullTransport count={self.count}>"
