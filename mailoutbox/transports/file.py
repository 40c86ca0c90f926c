"""A transport that writes each message to a .eml file, for development."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import TransientSendError
from .base import Envelope, SendResult


class FileTransport:
    """Writes each message to ``<directory>/<delivery_id>.eml``.

    The file holds the RFC 5322 bytes exactly as an SMTP server would receive
    them; any mail client opens it. The directory is created on first use.
    Files appear atomically (written to a temporary file, then renamed), so a
    reader never sees half a message, and a retried delivery replaces its
    earlier file. The SMTP envelope (sender, bcc recipients) is not written.
    Safe to use from many threads at once.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path_for(self, envelope: Envelope) -> Path:
        """The file `send` writes `envelope` to."""
        return self.directory / f"{envelope.delivery_id}.eml"

    def send(self, envelope: Envelope) -> SendResult | None:
        """Write the message atomically.

        Raises TransientSendError when the file cannot be written (a full disk or
        a missing permission can be fixed before the retry).
        """
        try:
            self._write(envelope)
        except OSError as exc:
            target = self.path_for(envelope)
            raise TransientSendError(None, f"cannot write {target}: {exc}") from exc
        return None

    def _write(self, envelope: Envelope) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path_for(envelope)
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=".", suffix=".eml.tmp")
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(envelope.message)
                tmp.flush()
                os.fsync(tmp.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise

    def close(self) -> None:
        """Nothing to release; present so every transport can be closed alike."""

    def __repr__(self) -> str:
        return f"<FileTransport directory={str(self.directory)!r}>"
