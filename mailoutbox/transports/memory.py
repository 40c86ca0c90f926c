"""A transport that keeps messages in memory, for tests and examples."""

from __future__ import annotations

import threading
from collections.abc import Callable

from .base import Envelope, SendResult

Handler = Callable[[Envelope], SendResult | None]


class MemoryTransport:
    """Records every envelope it is given in `sent`, in the order `send` was called.

    Modelled on httpx's MockTransport: an optional `handler` sees each envelope
    first and decides the outcome. It may return a SendResult (for example with
    `refused` recipients), return None, or raise TransientSendError,
    UnknownSendOutcome or PermanentSendError to simulate a failure. An envelope
    is recorded in `sent` only when the handler returns; failed sends are
    counted in `failed`. Safe to use from many threads at once.
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler = handler
        self.sent: list[Envelope] = []
        self.failed: list[Envelope] = []
        self._lock = threading.Lock()

    def send(self, envelope: Envelope) -> SendResult | None:
        """Run the handler (if any), then record the envelope in `sent`."""
        result: SendResult | None = None
        if self.handler is not None:
            try:
                result = self.handler(envelope)
            except BaseException:
                with self._lock:
                    self.failed.append(envelope)
                raise
        with self._lock:
            self.sent.append(envelope)
        return result

    def clear(self) -> None:
        """Forget every recorded envelope."""
        with self._lock:
            self.sent.clear()
            self.failed.clear()

    def close(self) -> None:
        """Nothing to release; present so every transport can be closed alike."""

    def __repr__(self) -> str:
        return f"<MemoryTransport sent={len(self.sent)} failed={len(self.failed)}>"
