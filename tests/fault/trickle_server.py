"""A hostile SMTP server that answers one byte at a time, forever (scenario 7).

It speaks just enough SMTP to get a client to the chosen stage, then sends an
endless multi-line reply (``220-...`` or ``250-...`` continuation lines), one
byte every `interval` seconds: every single read completes well within any
socket timeout, yet the reply never ends. `stop()` closes every connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

STAGES = ("greeting", "ehlo", "final reply")


class TrickleServer:
    def __init__(self, stage: str, interval: float = 0.05) -> None:
        assert stage in STAGES
        self.stage = stage
        self.interval = interval
        self._listener = socket.create_server(("127.0.0.1", 0))
        # close() does not wake a thread blocked in accept(): poll instead.
        self._listener.settimeout(0.1)
        self.host, self.port = self._listener.getsockname()[:2]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.trickling = threading.Event()

    def __enter__(self) -> TrickleServer:
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()
        for thread in self._threads:
            thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                self._clients.append(client)
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _trickle(self, client: socket.socket, code: bytes) -> None:
        self.trickling.set()
        line = code + b"-still working on it\r\n"
        while not self._stop.is_set():
            for byte in line:
                if self._stop.is_set():
                    return
                client.sendall(bytes([byte]))
                time.sleep(self.interval)

    def _serve(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError), client.makefile("rb") as reader:
            if self.stage == "greeting":
                self._trickle(client, b"220")
                return
            client.sendall(b"220 trickle.localhost ESMTP\r\n")
            while not self._stop.is_set():
                line = reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    if self.stage == "ehlo":
                        self._trickle(client, b"250")
                        return
                    client.sendall(b"250 trickle.localhost\r\n")
                elif verb == b"DATA":
                    client.sendall(b"354 go ahead\r\n")
                    while reader.readline() not in (b".\r\n", b""):
                        pass
                    self._trickle(client, b"250")
                    return
                elif verb == b"QUIT":
                    client.sendall(b"221 bye\r\n")
                    return
                else:
                    client.sendall(b"250 OK\r\n")
