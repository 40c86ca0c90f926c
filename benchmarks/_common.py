"""What the benchmark driver (run.py) and its child processes (_child.py) share.

Importing this module puts the repository root on sys.path, so the benchmark
runs from a checkout without installing mailoutbox. Nothing here imports from
tests/.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402

from mailoutbox import Envelope, Mail, NullTransport, SendResult  # noqa: E402

SENDER = "Shop <noreply@shop.example.com>"
TEMPLATE = "order-shipped"
SUBJECT = "Your order #{i} has shipped"

# 1 KB of plain ASCII text in lines of about 70 characters, like a transactional mail.
_LINE = "Thank you for your order. It left our warehouse today and is on its way."
BODY_1KB = ("Hello,\n\n" + "\n".join([_LINE] * 14) + "\n\nThe Shop team\n")[:1024]
if not BODY_1KB.endswith("\n"):
    BODY_1KB = BODY_1KB[:-1] + "\n"
assert len(BODY_1KB.encode()) == 1024


def recipient(i: int) -> str:
    return f"customer{i}@example.com"


def bench_mail(i: int, tag: str) -> Mail:
    """The benchmark's mail: text only, a 1 KB body, one recipient."""
    return Mail(
        template_id=TEMPLATE,
        idempotency_key=f"{tag}-{i}",
        to=[recipient(i)],
        subject=SUBJECT.format(i=i),
        text=BODY_1KB,
    )


def psycopg_url(url: str | sa.URL) -> sa.URL:
    """A SQLAlchemy URL on the psycopg 3 driver."""
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def url_text(url: sa.URL) -> str:
    """The URL with its password, to hand to a child process."""
    return url.render_as_string(hide_password=False)


def libpq_url(url: sa.URL) -> str:
    """The same database as a libpq URI (for psycopg used directly)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def emit(event: str, **fields: Any) -> None:
    """A protocol line from a child process to the driver (stdout is reserved for these)."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class RecordingNullTransport(NullTransport):
    """The null transport, also noting which delivery it got when (for verification).

    `seen` holds (delivery id, wall-clock time of send, message size) per call.
    list.append is atomic under the GIL, so the worker's send threads may share it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[uuid.UUID, float, int]] = []
        self.sample: Envelope | None = None
        self._sample_lock = threading.Lock()

    def send(self, envelope: Envelope) -> SendResult | None:
        self.seen.append((envelope.delivery_id, time.time(), len(envelope.message)))
        if self.sample is None:
            with self._sample_lock:
                if self.sample is None:
                    self.sample = envelope
        return super().send(envelope)


def check_sample(envelope: Envelope | None) -> str | None:
    """Parse a rendered message back; None if it is the mail we enqueued, else what is wrong."""
    import email.parser
    import email.policy

    if envelope is None:
        return "no message was sent"
    msg = email.parser.BytesParser(policy=email.policy.default).parsebytes(envelope.message)
    problems = []
    if msg["Message-ID"] != envelope.message_id or str(envelope.delivery_id) not in str(
        msg["Message-ID"]
    ):
        problems.append(f"Message-ID {msg['Message-ID']!r} vs {envelope.message_id!r}")
    if msg.get_content_type() != "text/plain":
        problems.append(f"content type {msg.get_content_type()}")
    body = msg.get_content().replace("\r\n", "\n")
    if body != BODY_1KB:
        problems.append("body differs from the enqueued text")
    if not str(msg["Subject"]).startswith("Your order #"):
        problems.append(f"subject {msg['Subject']!r}")
    if len(envelope.recipients) != 1 or str(msg["To"]) != envelope.recipients[0]:
        problems.append(f"To {msg['To']!r} vs envelope {envelope.recipients!r}")
    return "; ".join(problems) or None
