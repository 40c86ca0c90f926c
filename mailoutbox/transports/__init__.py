"""Transports hand a rendered message to the world; see base.Transport.

`SmtpTransport` talks to a real server; `MemoryTransport` (tests, examples),
`FileTransport` (development: one .eml file per message) and `NullTransport`
(benchmarks) stand in for one.
"""

from .base import Envelope, SendResult, Transport, close_transport
from .file import FileTransport
from .memory import MemoryTransport
from .null import NullTransport
from .smtp import SmtpTransport

__all__ = [
    "Transport",
    "Envelope",
    "SendResult",
    "SmtpTransport",
    "MemoryTransport",
    "FileTransport",
    "NullTransport",
    "close_transport",
]
