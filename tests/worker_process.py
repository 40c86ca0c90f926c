"""A worker process for the crash tests: `python -m tests.worker_process URL LOG [options]`.

Its transport appends each Message-ID to LOG (one atomic write per line) after a
pause, so a test can count what was "sent", including sends the database never
heard of because the process died first. A mail whose subject is `poison` kills
the process with SIGKILL in the middle of its send.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from datetime import timedelta

import sqlalchemy as sa

from mailoutbox import Outbox
from mailoutbox.retry import RetryPolicy
from mailoutbox.transports.base import Envelope, SendResult
from mailoutbox.worker import Worker


class LogTransport:
    def __init__(self, path: str, delay: float) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.delay = delay

    def send(self, envelope: Envelope) -> SendResult | None:
        if b"\r\nSubject: poison\r\n" in envelope.message:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.delay)
        os.write(self.fd, f"{envelope.message_id}\n".encode())
        return None

    def close(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("log")
    parser.add_argument("--name", required=True)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--delay", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-attempts", type=int, default=8)
    args = parser.parse_args()
    engine = sa.create_engine(args.url, pool_size=2)
    worker = Worker(
        Outbox(engine),
        LogTransport(args.log, args.delay),
        retry=RetryPolicy(
            max_attempts=args.max_attempts, base_delay=timedelta(0), max_delay=timedelta(0)
        ),
        batch_size=args.batch,
        concurrency=args.concurrency,
        lease=timedelta(seconds=args.lease),
        poll_interval=timedelta(milliseconds=200),
        name=args.name,
    )
    worker.run()
    engine.dispose()


if __name__ == "__main__":
    main()
