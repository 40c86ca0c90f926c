"""Keeps N copies of a long-running function alive in child processes.

`mailoutbox worker --processes N` runs here. One Python worker is bound to one
core (its sends share a GIL); a host with more cores runs several, and they
never claim the same delivery (FOR UPDATE SKIP LOCKED), so nothing but the
processes themselves needs coordinating.

Rules, in the order an operator meets them:

- Children are started with multiprocessing's *spawn* method: a fresh
  interpreter, no copied connection pool, no inherited threads.
- A child that exits while the supervisor is not stopping (a crash, a kill, an
  unexpected return) is started again after a delay that doubles from 1 s to
  60 s, and resets once a child has run for a minute: a worker that dies at
  start-up (database gone) does not spin.
- SIGTERM or SIGINT to the supervisor is passed on as SIGTERM to every child,
  which finishes its sends in flight; the supervisor waits for all of them and
  exits 0. (Ctrl-C in a terminal reaches the children too. A child still
  starting ignores it and stops on the SIGTERM; a running worker already
  stopping takes the second signal as the same stop.)
- A child whose supervisor disappears (SIGKILL, OOM killer) notices within a
  second and stops itself the same way, so no orphan keeps sending.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 60.0
HEALTHY_AFTER = 60.0  # a child that ran this long resets the restart delay
ORPHAN_CHECK_INTERVAL = 1.0


@dataclass
class _Slot:
    """One of the N places a child runs in, with its restart state."""

    index: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    delay: float = FIRST_RESTART_DELAY
    restart_at: float | None = None


def supervise(
    count: int,
    target: Callable[[int], None],
    *,
    stop: threading.Event | None = None,
    handle_signals: bool = True,
) -> None:
    """Run `target(index)` for index 1..count in child processes until stopped.

    `target` must be picklable (a module-level function, or a functools.partial
    of one): it travels to a fresh interpreter. Returns once `stop` is set (or
    SIGTERM/SIGINT arrives) and every child has exited.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    stop = stop or threading.Event()
    context = multiprocessing.get_context("spawn")
    slots = [_Slot(index) for index in range(1, count + 1)]
    previous = _install_handlers(stop) if handle_signals else {}
    try:
        for slot in slots:
            _start(context, slot, target)
        while not stop.is_set():
            _look_after(context, slots, target)
            stop.wait(0.2)
    finally:
        _stop_all(slots)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _start(context: multiprocessing.context.SpawnContext, slot: _Slot, target: Any) -> None:
    process = context.Process(
        target=_child_main,
        args=(target, slot.index, os.getpid()),
        name=f"mailoutbox-worker-{slot.index}",
    )
    with _children_ignore_sigint():
        process.start()
    slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None
    log.info("worker process %d started (pid %d)", slot.index, process.pid)


def _look_after(
    context: multiprocessing.context.SpawnContext, slots: list[_Slot], target: Any
) -> None:
    now = time.monotonic()
    for slot in slots:
        if slot.restart_at is not None:
            if now >= slot.restart_at:
                _start(context, slot, target)
            continue
        process = slot.process
        if process is None or process.is_alive():
            continue
        code = process.exitcode if process.exitcode is not None else -1
        pid = process.pid
        process.close()
        if now - slot.started_at >= HEALTHY_AFTER:
            slot.delay = FIRST_RESTART_DELAY
        log.warning(
            "worker process %d (pid %s) exited with %s; starting it again in %s s",
            slot.index,
            pid,
            _describe_exit(code),
            f"{slot.delay:g}",
        )
        slot.process, slot.restart_at = None, now + slot.delay
        slot.delay = min(slot.delay * 2, MAX_RESTART_DELAY)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _stop_all(slots: list[_Slot]) -> None:
    running = [s.process for s in slots if s.process is not None and s.process.is_alive()]
    for process in running:
        if process.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
    # No timeout: each worker finishes the sends in flight, bounded by its SMTP timeout.
    for process in running:
        process.join()
    log.info("all %d worker processes stopped", len(slots))


def _install_handlers(stop: threading.Event) -> dict[int, Any]:
    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("received %s: stopping the worker processes", signal.Signals(signum).name)
        stop.set()

    return {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Children started in the block begin with SIGINT ignored.

    Ctrl-C in a terminal signals the whole foreground group. A child still
    importing would die of it with a KeyboardInterrupt traceback, and the
    supervisor's SIGTERM is what stops children anyway. An ignored signal stays
    ignored across exec, so the disposition is lent to the children; SIGINT is
    blocked meanwhile, so a Ctrl-C to the supervisor is delayed, not lost. The
    child unblocks it (_child_main), and the worker installs its own handler.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal dispositions can only be changed from the main thread
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


# --- in the child -------------------------------------------------------------------------


def _child_main(target: Callable[[int], None], index: int, parent_pid: int) -> None:
    # Inherited from _children_ignore_sigint: ignored (a pending one is dropped), blocked.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    threading.Thread(
        target=_stop_when_orphaned, args=(parent_pid,), name="orphan-watch", daemon=True
    ).start()
    target(index)


def _stop_when_orphaned(parent_pid: int) -> None:
    # A child whose parent died is re-parented; SIGTERM to itself takes the worker's
    # own graceful path (finish the sends in flight, exit).
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_CHECK_INTERVAL)
    log.warning("the supervisor (pid %d) is gone: stopping", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)
