"""What the fake servers share: a threaded HTTP/1.1 server, request records and replies, fault
bookkeeping, and the outbound calls and image work of the provider fakes.

A fake subclasses ``FakeHTTPServer`` and keeps only its protocol logic:

    class FakeThing(FakeHTTPServer):
        def dispatch(self, call: RecordedCall, raw: bytes) -> Reply:
            return json_reply(200, {"echo": call.body})

    with FakeThing() as fake:
        httpx.post(f"{fake.base_url}/x", json=[1])

``FakeHTTPServer`` binds 127.0.0.1 and a free port when built, serves from ``__enter__``
and, on ``__exit__``, sets ``stopping``, wakes ``_changed``, stops the server and waits (5 s
in all) for it and for every thread started with ``spawn``. Each request's body is read in
full (Content-Length or chunked) before ``handle`` sees it; by default ``handle`` parses it
into a ``RecordedCall`` (JSON when it is JSON) and sends what ``dispatch`` returns. A fake that
writes to the socket itself (streaming, trickling) overrides ``handle``. Methods outside
``methods`` answer 501, as ``BaseHTTPRequestHandler`` does. A client hanging up mid-answer
only closes that connection.

``Faults`` holds armed faults (``inject``): checked against the kinds and the parameters each
needs, matched by scope (a task type, a route) in arming order, used up after ``times``.

Outbound calls (``fetch_url``, ``deliver``) use urllib with a 5 s timeout and never a proxy
from the environment.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

FETCH_TIMEOUT_S = 5.0
MAX_FETCH_BYTES = 50 * 1024 * 1024
ALL_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})
WEB_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})  # Pillow's names
INPUT_FORMATS = WEB_FORMATS | {"BMP", "GIF"}

_DATA_URI_RE = re.compile(r"data:(?:image/[\w.+-]+)?(?:;[\w.+-]+=[\w.+-]+)*;base64,(.*)", re.S)
# Deliveries and fetches never go through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- records and replies ---------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedCall:
    method: str
    path: str  # path and query as received
    headers: dict[str, str]  # lower-case names
    body: Any  # the parsed JSON body, or the raw bytes when it is not JSON
    at: float = field(default_factory=time.monotonic, compare=False)  # when it arrived

    @classmethod
    def of(cls, handler: Handler, raw: bytes) -> RecordedCall:
        try:
            body: Any = json.loads(raw) if raw else raw
        except ValueError:
            body = raw
        return cls(handler.command, handler.path, handler.header_dict(), body)


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering


def json_reply(status: int, payload: Any, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(payload).encode()
    return Reply(status, body, {"Content-Type": "application/json", **(headers or {})})


# --- the server ------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FakeHTTPServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up or giving up (read timeouts) is what several tests do on purpose.
        pass


class Handler(BaseHTTPRequestHandler):
    """One connection: reads each request's body, then lets the owning fake answer."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes: without this, Nagle and the client's delayed
        # ACK add 40 ms to every answer on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle(self) -> None:
        owner = self.server.owner
        if self.command not in owner.methods:
            self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})")
            return
        raw = self.read_body()
        try:
            owner.handle(self, raw)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

    def header_dict(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts: list[bytes] = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length", "0") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, reply: Reply) -> None:
        if reply.drop:
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in {"Content-Length": str(len(reply.body)), **reply.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)


class FakeHTTPServer:
    """Context manager: a real HTTP server in a thread, on 127.0.0.1 and a free port.

    For subclasses: ``lock`` (reentrant) guards their state, ``_changed`` is a condition on
    it, ``stopping`` is set on exit; ``spawn`` starts a thread that exit waits for; ``started``
    runs once the server serves.
    """

    methods: frozenset[str] = ALL_METHODS

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self._changed = threading.Condition(self.lock)
        self._threads: list[threading.Thread] = []
        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.owner = self
        # A short poll interval: shutdown() waits up to one interval, for every test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        self.started()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stopping.set()
        with self._changed:
            self._changed.notify_all()
            threads = list(self._threads)
        self._server.shutdown()
        self._server.server_close()
        deadline = time.monotonic() + 5
        for thread in [self._thread, *threads]:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def started(self) -> None:
        """Called by ``__enter__`` once the server runs."""

    def spawn(self, target: Callable[..., object], *args: Any) -> None:
        """Run ``target(*args)`` in a daemon thread that ``__exit__`` waits for."""
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self.lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def handle(self, handler: Handler, raw: bytes) -> None:
        """Answer one request whose body ``raw`` was read: by default, send ``dispatch``'s."""
        handler.send(self.dispatch(RecordedCall.of(handler, raw), raw))

    def dispatch(self, call: RecordedCall, raw: bytes) -> Reply:
        raise NotImplementedError


# --- fault injection -------------------------------------------------------------------------


@dataclass
class Fault:
    """One armed fault; ``scope`` (a task type, a route...) narrows what it matches."""

    kind: str
    scope: str | None  # None: any
    times: int
    params: dict[str, Any]

    def is_pre_accept(self) -> bool:
        """``status``, or ``malformed`` without ``after_accept``: answered before accepting."""
        return self.kind == "status" or (
            self.kind == "malformed" and not self.params.get("after_accept")
        )

    def is_post_accept(self) -> bool:
        """``accept_then_*``, or ``malformed`` with ``after_accept``: answered once accepted."""
        return self.kind.startswith("accept_then_") or (
            self.kind == "malformed" and bool(self.params.get("after_accept"))
        )


class Faults:
    """A fake's armed faults, each used up after ``times`` matches; thread-safe."""

    def __init__(self, kinds: frozenset[str], required: Mapping[str, tuple[str, ...]]) -> None:
        self._kinds = kinds
        self._required = required  # kind -> the params it needs
        self._armed: list[Fault] = []
        self._lock = threading.Lock()

    def check(self, kind: str, times: int, params: Mapping[str, Any]) -> None:
        if kind not in self._kinds:
            raise ValueError(f"unknown fault kind {kind!r}")
        missing = [name for name in self._required.get(kind, ()) if name not in params]
        if missing or times < 1:
            raise ValueError(f"fault {kind!r} needs {missing} and times >= 1")

    def arm(self, kind: str, scope: str | None, times: int, params: Mapping[str, Any]) -> None:
        self.check(kind, times, params)
        with self._lock:
            self._armed.append(Fault(kind, scope, times, dict(params)))

    def take(self, scopes: Collection[str], wanted: Callable[[Fault], bool]) -> Fault | None:
        """Use once the first fault, in arming order, for one of ``scopes`` that is wanted."""
        with self._lock:
            for fault in self._armed:
                if (fault.scope is None or fault.scope in scopes) and wanted(fault):
                    fault.times -= 1
                    if fault.times == 0:
                        self._armed.remove(fault)
                    return fault
        return None

    def pending(self, scope: str | None = None) -> int:
        """Uses left of the armed faults (of one scope, when given)."""
        with self._lock:
            return sum(f.times for f in self._armed if scope is None or f.scope == scope)


# --- outbound calls --------------------------------------------------------------------------


def is_http_url(value: Any) -> bool:
    parts = urlsplit(value) if isinstance(value, str) else None
    return parts is not None and parts.scheme in ("http", "https") and bool(parts.hostname)


def fetch_url(url: str) -> bytes | None:
    """The body of a GET (at most MAX_FETCH_BYTES), or None on any failure."""
    try:
        with _OPENER.open(url, timeout=FETCH_TIMEOUT_S) as response:
            data: bytes = response.read(MAX_FETCH_BYTES)
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None


def deliver(url: str, method: str, body: bytes, content_type: str) -> int:
    """One delivery: the HTTP status, or 0 when no answer came."""
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": content_type}
    )
    try:
        with _OPENER.open(request, timeout=FETCH_TIMEOUT_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return 0


# --- images ----------------------------------------------------------------------------------


def decode_base64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def decode_data_uri(text: str) -> bytes | None:
    match = _DATA_URI_RE.fullmatch(text)
    return decode_base64(match.group(1)) if match else None


def open_image(data: bytes | None, formats: frozenset[str]) -> Image.Image | None:
    """The decoded image, or None unless it is one of ``formats`` (Pillow's names)."""
    if not data:
        return None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None
    return image if image.format in formats else None


def render_result(seed: Image.Image, index: int, pil_format: str, quality: int) -> bytes:
    """Result ``index``: the seed inverted and tinted; deterministic per (seed, index)."""
    inverted = ImageOps.invert(seed.convert("RGB"))
    tint = ((index * 97) % 256, (index * 57 + 128) % 256, (index * 31 + 64) % 256)
    image = Image.blend(inverted, Image.new("RGB", inverted.size, tint), 0.25)
    buffer = io.BytesIO()
    if pil_format == "PNG":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=pil_format, quality=quality)
    return buffer.getvalue()
