"""A threaded HTTP/1.1 server on 127.0.0.1 for fetch and upload tests.

    with FileServer() as server:
        server.add("/cat.png", png_bytes)
        url = server.url("/cat.png")

Routes besides registered files (any query string is allowed and ignored unless named):
    /redirect?to=URL[&status=302]        redirect anywhere
    /chain/N                             N redirects in a row, then 200 b"chain-end"
    /slow?delay=S                        sleep S seconds before answering
    /trickle?delay=S&count=N             declare N bytes, send one every S seconds
    /status/CODE[?retry_after=X]         empty answer with that status (and Retry-After)
    /declared?size=N                     declare N bytes, send a few, close
    /stream?chunk=S[&count=N]            chunked body, unbounded unless count is given
    (a registered path may first fail N times with 503: ``add(..., fail_first=N)``)
    /s3error/STATUS/CODE[?message=M&retry_after=X]   S3's XML error body, any method
    PUT anything else                    200 with an ETag (a presigned-URL target)
Every request is recorded (method, target, headers, body) in ``server.requests``.
``put_verifier`` may refuse PUTs (e.g. a SigV4 check answering S3's 403 XML).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from servers.http import FakeHTTPServer, Handler, Reply


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    target: str  # path and query exactly as received
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)


Canned = Reply  # the older name of a canned answer


PutVerifier = Callable[[RecordedRequest], Reply | None]


def s3_error_xml(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
        "<RequestId>4442587FB7D0A2F9</RequestId>"
        # S3 echoes request details next to the code: they must not reach our messages.
        "<StringToSign>AWS4-HMAC-SHA256 secret-ish</StringToSign></Error>"
    ).encode()


class FileServer(FakeHTTPServer):
    """Context manager: a real HTTP server in a thread, on 127.0.0.1 and a free port."""

    methods = frozenset({"GET", "HEAD", "PUT", "POST"})

    def __init__(self, put_verifier: PutVerifier | None = None) -> None:
        super().__init__()
        self.files: dict[str, Reply] = {}
        self.failures: dict[str, int] = {}
        self.requests: list[RecordedRequest] = []
        self.put_verifier = put_verifier

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def add(
        self,
        path: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        headers: dict[str, str] | None = None,
        status: int = 200,
        fail_first: int = 0,
    ) -> str:
        """Serve ``data`` at ``path`` (for any method); returns its URL.

        ``fail_first``: answer that many requests with 503 (Retry-After: 0) first.
        """
        self.files[path] = Reply(status, data, {"Content-Type": content_type, **(headers or {})})
        self.failures[path] = fail_first
        return self.url(path)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    # --- routing ---------------------------------------------------------------------

    def handle(self, handler: Handler, raw: bytes) -> None:
        """Record the request, then answer it by writing to ``handler`` (some routes stream)."""
        request = RecordedRequest(handler.command, handler.path, handler.header_dict(), raw)
        with self.lock:
            self.requests.append(request)
        self._route(handler, request)

    def _route(self, handler: Handler, request: RecordedRequest) -> None:
        path = request.path
        if path in self.files:
            with self.lock:
                failing = self.failures.get(path, 0) > 0
                if failing:
                    self.failures[path] -= 1
            if failing:
                handler.send(Reply(503, b"busy", {"Retry-After": "0"}))
            else:
                handler.send(self.files[path])
            return
        first = path.strip("/").split("/", 1)[0]
        route = _ROUTES.get(first)
        if route is not None:
            route(self, handler, request)
        elif request.method == "PUT":
            self._accept_put(handler, request)
        else:
            handler.send(Reply(404, b"not found", {"Content-Type": "text/plain"}))

    def _accept_put(self, handler: Handler, request: RecordedRequest) -> None:
        refusal = self.put_verifier(request) if self.put_verifier else None
        if refusal is not None:
            handler.send(refusal)
            return
        etag = hashlib.md5(request.body, usedforsecurity=False).hexdigest()
        handler.send(Reply(200, b"", {"ETag": f'"{etag}"'}))


def _arg(request: RecordedRequest, name: str, default: str = "") -> str:
    return request.query.get(name, [default])[0]


def _redirect(server: FileServer, handler: Handler, request: RecordedRequest) -> None:
    status = int(_arg(request, "status", "302"))
    handler.send(Reply(status, b"", {"Location": _arg(request, "to")}))


def _chain(server: FileServer, handler: Handler, request: RecordedRequest) -> None:
    left = int(request.path.rsplit("/", 1)[-1])
    if left <= 0:
        handler.send(Reply(200, b"chain-end", {"Content-Type": "text/plain"}))
    else:
        handler.send(Reply(302, b"", {"Location": f"/chain/{left - 1}"}))


def _slow(server: FileServer, handler: Handler, request: RecordedRequest) -> None:
    if server.stopping.wait(float(_arg(request, "delay", "5"))):
        return
    handler.send(Reply(200, b"slow", {"Content-Type": "text/plain"}))


def _trickle(server: FileServer, handler: Handler, request: RecordedRequest) -> None:
    delay = float(_arg(request, "delay", "0.2"))
    count = int(_arg(request, "count", "100"))
    handler.send_response(200)
    handler.send_header("Content-Length", str(count))
    handler.end_headers()
    for _ in range(count):
        if server.stopping.wait(delay):
            return
        handler.wfile.write(b"x")
        handler.wfile.flush()


def _status(server: FileServer, handler: Handler, request: RecordedRequest) -> None:
    code = int(request.path.rsplit("/", 1)[-1])
    headers = (
        {"Retry-After": _arg(request, "retry_after")} if "retry_after" in request.query else {}
    )
    handler.send(Reply(code, b"", headers))


def _declared(server: FileServer, handler: Handler, request: RecordedRequest) -> None:
    handler.send_response(200)
    handler.send_header("Content-Length", _arg(request, "size", "1000000000"))
    handler.end_headers()
    handler.wfile.write(b"\x89PNG\r\n\x1a\n" * 2)
    handler.close_connection = True


def _stream(server: FileServer, handler: Handler, request: RecordedRequest) -> None:
    chunk = b"z" * int(_arg(request, "chunk", "65536"))
    count = int(_arg(request, "count", "0")) or None
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for _ in _counter(count):
        if server.stopping.is_set():
            return
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    handler.wfile.write(b"0\r\n\r\n")


def _counter(count: int | None) -> Iterator[int]:
    n = 0
    while count is None or n < count:
        yield n
        n += 1


def _s3error(server: FileServer, handler: Handler, request: RecordedRequest) -> None:
    _, status, code = request.path.strip("/").split("/", 2)
    headers = {"Content-Type": "application/xml"}
    if "retry_after" in request.query:
        headers["Retry-After"] = _arg(request, "retry_after")
    body = s3_error_xml(code, _arg(request, "message", f"{code} from the test server"))
    handler.send(Reply(int(status), body, headers))


_ROUTES: dict[str, Callable[[FileServer, Handler, RecordedRequest], None]] = {
    "redirect": _redirect,
    "chain": _chain,
    "slow": _slow,
    "trickle": _trickle,
    "status": _status,
    "declared": _declared,
    "stream": _stream,
    "s3error": _s3error,
}
