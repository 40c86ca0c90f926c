"""Child processes of the benchmark: `python _child.py ROLE` (configuration in the environment).

Roles:

- ``drain``: a Worker on the null (or SMTP) transport; on ``go`` it ticks until
  nothing is due, then reports its start/end times and the deliveries it sent.
- ``run``: `Worker.run()` with LISTEN/NOTIFY until ``stop``; reports when it
  sent each delivery (for the latency figures).
- ``sink``: an aiosmtpd server on 127.0.0.1; on ``stop`` reports the Message-IDs
  it accepted.
- ``pgqueuer``: the peer; loads N jobs, and on ``go`` drains them with
  pgqueuer's QueueManager, rendering each with mailoutbox's renderer.

Protocol: JSON lines. The child prints ``{"event": "ready", ...}`` once set up
and ``{"event": "done", ...}`` at the end; the driver writes ``go`` / ``stop``
lines on stdin. End of stdin (the driver went away) ends the child at once, so
no child outlives its driver. Bulky results go to the file ``config["out"]``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
from _common import emit


class Commands:
    """Reads driver commands from stdin on a daemon thread."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.stop = threading.Event()
        threading.Thread(target=self._read, daemon=True, name="bench-stdin").start()

    def _read(self) -> None:
        for line in sys.stdin:
            command = line.strip()
            if command == "go":
                self.go.set()
            elif command == "stop":
                self.stop.set()
        # The driver closed our stdin or died: leave now, whatever we were doing.
        os._exit(0)


def _write(path: str, data: dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _worker_parts(config: dict[str, Any]) -> tuple[Any, Any]:
    import sqlalchemy as sa

    from mailoutbox import Outbox

    engine = sa.create_engine(config["url"], pool_size=4, max_overflow=4)
    outbox = Outbox(engine, schema=config["schema"], default_sender=_common.SENDER)
    return engine, outbox


def role_drain(config: dict[str, Any], commands: Commands) -> None:
    from mailoutbox import SmtpTransport, TickReport, Worker

    _, outbox = _worker_parts(config)
    transport: Any
    if config.get("smtp_port"):
        transport = SmtpTransport("127.0.0.1", config["smtp_port"], security="none", timeout=30.0)
    else:
        transport = _common.RecordingNullTransport()
    worker = Worker(
        outbox,
        transport,
        batch_size=config.get("batch_size", 100),
        concurrency=config.get("concurrency", 8),
    )
    worker.tick()  # warm up: connections, compiled claim statement, send threads
    emit("ready")
    commands.go.wait()
    profile = _start_profile(config)
    start = time.time()
    total = TickReport()
    ticks = 0
    while True:
        report = worker.tick()
        ticks += 1
        total += report
        if not report.claimed:
            break
    end = time.time()
    _stop_profile(profile, config)
    result: dict[str, Any] = {
        "start": start,
        "end": end,
        "report": total.__dict__,
        "ticks": ticks,
    }
    if isinstance(transport, _common.RecordingNullTransport):
        result["ids"] = [d.hex for d, _, _ in transport.seen]
        result["bytes"] = sum(size for _, _, size in transport.seen)
        result["sample_problem"] = _common.check_sample(transport.sample)
    _report_and_linger(config, result, start=start, end=end, sent=total.sent)


def _report_and_linger(config: dict[str, Any], result: dict[str, Any], **done: Any) -> None:
    """Write the result, say ``done``, and keep this process and its database
    connections until the driver closes our stdin (Commands ends the process then).

    The driver reads PostgreSQL's CPU right after ``done``. A backend whose client
    went away while it read would be missing from the server's processes and not
    yet in the postmaster's children times, and take the drain's CPU with it (seen:
    a negative figure).
    """
    _write(config["out"], result)
    emit("done", **done)
    threading.Event().wait()


def role_run(config: dict[str, Any], commands: Commands) -> None:
    """worker.run() with LISTEN/NOTIFY until the driver says stop."""
    from mailoutbox import Worker

    engine, outbox = _worker_parts(config)
    transport = _common.RecordingNullTransport()
    worker = Worker(outbox, transport, batch_size=100, concurrency=8, listen=True)
    emit("ready")
    worker.run(commands.stop, handle_signals=False)
    engine.dispose()
    _write(
        config["out"],
        {
            "sends": [(d.hex, at) for d, at, _ in transport.seen],
            "sample_problem": _common.check_sample(transport.sample),
        },
    )
    emit("done", sent=len(transport.seen))


def role_sink(config: dict[str, Any], commands: Commands) -> None:
    from _sink import Sink

    sink = Sink()
    sink.start()
    emit("ready", port=sink.port)
    commands.stop.wait()
    sink.stop()
    _write(config["out"], {"ids": sink.ids, "problems": sink.problems[:20]})
    emit("done", received=len(sink.ids))


def role_pgqueuer(config: dict[str, Any], commands: Commands) -> None:
    import asyncio

    from _peer import event_loop_factory, pgqueuer_drain

    factory = event_loop_factory()
    loop = factory() if factory is not None else asyncio.new_event_loop()

    def finished(result: dict[str, Any]) -> None:
        # Called with pgqueuer's connection still open; never returns.
        _report_and_linger(
            config, result, start=result["start"], end=result["end"], handled=len(result["ids"])
        )

    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(pgqueuer_drain(config, commands.go, emit, finished))
    finally:
        loop.close()


_PROFILER: dict[str, Any] = {}


def _start_profile(config: dict[str, Any]) -> Any:
    """Optional in-process profile of the timed section (pyinstrument), for --profile."""
    target = config.get("pyinstrument")
    if not target:
        return None
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.0005, async_mode="disabled")
    profiler.start()
    return profiler


def _stop_profile(profiler: Any, config: dict[str, Any]) -> None:
    if profiler is None:
        return
    profiler.stop()
    target = config["pyinstrument"]
    Path(target).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
    Path(target).with_suffix(".html").write_text(profiler.output_html())


ROLES = {"drain": role_drain, "run": role_run, "sink": role_sink, "pgqueuer": role_pgqueuer}


def main() -> None:
    role, config = sys.argv[1], json.loads(os.environ.pop("MAILOUTBOX_BENCH_CHILD"))
    commands = Commands()
    try:
        ROLES[role](config, commands)
    except BaseException as exc:
        emit("error", error=f"{type(exc).__name__}: {exc}")
        raise
    sys.stdout.flush()
    os._exit(0)  # don't wait on daemon threads or pools left by libraries


if __name__ == "__main__":
    main()
