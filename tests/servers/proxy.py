"""A TCP proxy whose link can go dark: for a worker cut off from Redis while the rest of
the world (the provider, storage) stays reachable.

    with DarkProxy("127.0.0.1", redis_port) as proxy:
        env["BGSWAP_BROKER_URL"] = f"redis://127.0.0.1:{proxy.port}/0"
        proxy.dark()    # nothing is forwarded any more; connections stay open
        proxy.light()   # what waited is forwarded, in order, and the link works again

Dark is what a partition looks like to TCP: no reset, no answer, the bytes sent wait (the
kernel would retransmit them) and arrive once the link is back, so a command that a
client gave up on may still run late on the server. New connections are accepted while
dark but reach the target only once the link is back.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class DarkProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._stopping = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> DarkProxy:
        self._spawn(self._accept)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stopping.set()
        self._forwarding.set()  # wake every pump, so it sees the stop
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                _close(sock)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def dark(self) -> None:
        self._forwarding.clear()

    def light(self) -> None:
        self._forwarding.set()

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._spawn(self._connect, client)

    def _connect(self, client: socket.socket) -> None:
        self._wait_for_light()
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            _close(client)
            return
        with self._lock:
            self._sockets += [client, upstream]
        self._spawn(self._pump, client, upstream)
        self._spawn(self._pump, upstream, client)

    def _wait_for_light(self) -> None:
        while not self._forwarding.wait(0.2):
            if self._stopping.is_set():
                return

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy one direction; while dark, what was read waits here for the light."""
        try:
            while not self._stopping.is_set():
                data = source.recv(65536)
                self._wait_for_light()
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            _close(sink)
            _close(source)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
