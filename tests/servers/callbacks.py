"""A completion-callback receiver: records every POST (raw body and headers) and answers
from a script of statuses per event, then 200.

    with CallbackReceiver(fail_first=2) as receiver:   # 500, 500, then 200 per event_id
        ...
        receiver.wait_for(1)                           # events accepted (2xx)
        receiver.accepted                              # [(headers, raw body)], one per id
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass

from servers.http import FakeHTTPServer, RecordedCall, Reply, json_reply


@dataclass(frozen=True)
class Delivery:
    headers: dict[str, str]
    raw: bytes
    status: int  # what the receiver answered

    @property
    def event(self) -> dict[str, object]:
        parsed: dict[str, object] = json.loads(self.raw)
        return parsed


class CallbackReceiver(FakeHTTPServer):
    methods = frozenset({"POST"})

    def __init__(self, fail_first: int = 0, fail_status: int = 500) -> None:
        super().__init__()
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.deliveries: list[Delivery] = []
        self.tries: Counter[str] = Counter()
        self.status_override: int | None = None  # answer this to every request when set

    @property
    def url(self) -> str:
        return f"{self.base_url}/hooks/bgswap"

    def dispatch(self, call: RecordedCall, raw: bytes) -> Reply:
        try:
            key = str(json.loads(raw).get("event_id"))
        except (ValueError, AttributeError):
            key = ""
        with self._changed:
            self.tries[key] += 1
            if self.status_override is not None:
                status = self.status_override
            else:
                status = self.fail_status if self.tries[key] <= self.fail_first else 200
            self.deliveries.append(Delivery(call.headers, raw, status))
            self._changed.notify_all()
        return json_reply(status, {"ok": status < 300})

    @property
    def accepted(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if 200 <= d.status < 300]

    def wait_for(self, accepted: int, timeout_s: float = 60) -> list[Delivery]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.accepted) < accepted and time.monotonic() < deadline:
                self._changed.wait(timeout=max(0.0, deadline - time.monotonic()))
            return self.accepted
