"""Fixtures of the fault suite (the database fixtures come from tests/conftest.py).

`outbox` is overridden here: the fault scenarios drive the synchronous Outbox
(the worker processes use it too), once per scenario.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from mailoutbox import Outbox

from ..smtp_sink import SmtpSink
from .harness import SENDER


@pytest.fixture
def outbox(engine: sa.Engine) -> Outbox:
    return Outbox(engine, schema="mailoutbox", default_sender=SENDER)


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    """A real SMTP server (aiosmtpd) in the test process, recording every message."""
    with SmtpSink() as server:
        yield server
