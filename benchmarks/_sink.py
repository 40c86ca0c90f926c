"""A minimal aiosmtpd sink for the smtp_loopback figure (runs in its own process).

It accepts every message on 127.0.0.1 (ephemeral port), keeps only the delivery
id found in each message's Message-ID header (``<{delivery_id}@domain>``, see
mailoutbox.render.message_id_for) and checks the envelope has one recipient.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

from aiosmtpd.smtp import SMTP

_MESSAGE_ID = re.compile(rb"^Message-ID: <([0-9a-f-]{36})@", re.MULTILINE | re.IGNORECASE)


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        data: bytes = envelope.original_content or envelope.content
        head = data[: data.find(b"\r\n\r\n")]
        match = _MESSAGE_ID.search(head)
        if match is None:
            self.sink.problems.append("a message without a delivery Message-ID")
        else:
            self.sink.ids.append(match.group(1).decode("ascii").replace("-", ""))
        if len(envelope.rcpt_tos) != 1:
            self.sink.problems.append(f"{len(envelope.rcpt_tos)} recipients")
        return "250 2.0.0 Message accepted"


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when installed (it keeps the sink from being the bottleneck)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


class Sink:
    """aiosmtpd on its own event-loop thread; `ids` are the accepted delivery ids (hex)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.problems: list[str] = []
        self.port = 0
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name="sink-loop")
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        handler = _Handler(self)

        def factory() -> SMTP:
            return SMTP(handler, hostname="sink.localhost", enable_SMTPUTF8=True)

        self._server = self._loop.run_until_complete(
            self._loop.create_server(factory, host="127.0.0.1", port=0, backlog=64)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the SMTP sink did not start")

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
