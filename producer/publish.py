"""Publishing row messages: one LPUSH per chunk of rows on a Redis broker.

Why not ``app.send_task`` per row: each call routes, fires signals, serializes, and
kombu makes a new Redis client per publish -- ~0.5-1.1 ms a row, a minute or more for
100,000 rows. On Redis a Celery message is only a JSON string on a list, so Celery itself
builds one real message (a probe, taken just before kombu would push it), and every row is
that string with its own task id, arguments and delivery tag spliced in: the bytes stay
those of the installed Celery/kombu, at a few microseconds a row. The probe is re-stamped
and compared with what Celery wrote before we rely on the copy; a broker or configuration
it does not reproduce, or publish signal receivers (which expect a call per message),
get ``send_task`` as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from json.encoder import encode_basestring_ascii
from typing import Any, cast

from celery.signals import after_task_publish, before_task_publish, task_sent
from celery.utils.saferepr import saferepr
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads
from kombu.utils.uuid import uuid

from producer.batch import Publish
from worker.jobs import TASK_PROCESS_ROW

log = logging.getLogger("bgswap.producer")

Message = tuple[str, str, int]  # (job id, batch id, row index)

REDIS_TRANSPORTS = frozenset({"redis", "rediss"})  # kombu's names; redis+socket is "redis"
# kombu's JSON is the stdlib's with an encoder for extra types; our values are all plain.
json_dumps = cast(Callable[[Any], str], kombu_dumps)
json_loads = cast(Callable[[str | bytes], Any], kombu_loads)
# A JSON string literal exactly as json.dumps(str) writes it (ensure_ascii, kombu's default).
json_str = encode_basestring_ascii

# The probe is never pushed. Its batch id has a quote, a backslash and non-ASCII so the
# self-check covers the escaping of JSON and of Celery's argsrepr.
PROBE_ID = "bgswap-probe-id"
PROBE_ARGS = ("bgswap-probe-'\"\\-é", 7)
# Slot markers: plain ASCII without braces, so JSON writes them unchanged.
SLOTS = ("id", "argsrepr", "tag", "body", "args")


def slot(name: str) -> str:
    return f"bgswap-slot-{name}"


def celery_publisher(app: Any) -> Publish:
    """Any broker: one ``send_task`` per message, one producer per chunk."""

    def publish(messages: Sequence[Message]) -> None:
        # One producer (one connection, one channel) for a whole chunk of messages.
        with app.producer_or_acquire() as producer:
            for job_id, batch_id, index in messages:
                app.send_task(
                    TASK_PROCESS_ROW, args=(batch_id, index), task_id=job_id, producer=producer
                )

    return publish


@dataclass(frozen=True)
class Template:
    """A Celery message as format strings: what differs from row to row is a slot."""

    envelope: str  # the message JSON; slots {id} {argsrepr} {tag} {body}
    body: str  # the body JSON before base64; slot {args}
    key: str  # the Redis list: kombu's name for the queue at the message's priority
    expire_keys: tuple[str, ...]  # kombu re-arms these on every put to an expiring queue
    expire_ms: int | None
    encode_body: Callable[[str], str]  # the channel's body codec (base64)
    repr_maxlen: int  # Celery's argsrepr_maxsize
    repr_maxlevels: int

    def argsrepr(self, batch_id: str, index: int) -> str:
        """The ``argsrepr`` header: Celery's saferepr of the args, ~10 µs a call, so taken
        once per batch id: saferepr writes an int as str(n), and cuts nothing short of
        maxlen."""
        head = argsrepr_head(batch_id, self.repr_maxlen, self.repr_maxlevels)  # "('b', "
        if len(head) + 22 < self.repr_maxlen:
            return f"{head}{index})"
        return str(saferepr((batch_id, index), self.repr_maxlen, self.repr_maxlevels))

    def stamp(self, job_id: str, batch_id: str, index: int, tag: str | None = None) -> str:
        """The JSON string for one row: what send_task would have pushed."""
        # The args as JSON, spelled out: kombu's dumps costs 10x more (the self-check
        # compares the result with kombu's own bytes).
        args = f"[{json_str(batch_id)}, {index}]"
        body = self.encode_body(self.body.format(args=args))
        return self.envelope.format(
            id=json_str(job_id),
            argsrepr=json_str(self.argsrepr(batch_id, index)),
            tag=json_str(tag or uuid()),
            body=json_str(body),
        )


@lru_cache(maxsize=16)
def argsrepr_head(batch_id: str, maxlen: int, maxlevels: int) -> str:
    return str(saferepr((batch_id, 0), maxlen, maxlevels)).removesuffix("0)")


def format_string(value: Any) -> str:
    """``value`` as JSON, made a format string: braces doubled, slot markers -> {name}."""
    text = json_dumps(value).replace("{", "{{").replace("}", "}}")
    for name in SLOTS:
        text = text.replace(json_str(slot(name)), "{" + name + "}")
    return text


def capture(app: Any, channel: Any) -> tuple[str, dict[str, Any]]:
    """Have Celery publish the probe on ``channel``; the queue and message kombu would push."""
    captured: list[tuple[str, dict[str, Any]]] = []
    # `_put(queue, message)` is the virtual transport's last step (the message complete,
    # its priority not yet mapped to a key). Taking it over for this one send keeps the
    # probe off the queue while routing, declaring the queue and encoding run for real.
    channel._put = lambda queue, message, **_: captured.append((queue, message))
    try:
        producer = app.amqp.Producer(channel, auto_declare=False)
        app.send_task(TASK_PROCESS_ROW, args=PROBE_ARGS, task_id=PROBE_ID, producer=producer)
    finally:
        del channel._put
    ((queue, message),) = captured
    return queue, message


def spliceable(message: dict[str, Any]) -> bool:
    """Protocol 2 (the task id in the headers) with a JSON text body (not compressed) to
    splice into; eta/expires are absolute times taken at send, which a copy would freeze."""
    headers = message["headers"]
    plain = not any(headers.get(k) for k in ("compression", "eta", "expires"))
    json_body = message["content-type"] == "application/json"
    return plain and json_body and headers.get("id") == PROBE_ID


def make_template(app: Any, channel: Any, queue: str, message: dict[str, Any]) -> Template | None:
    """The probe as a template, or None when a copy would not be what Celery sends."""
    headers, props = message["headers"], message["properties"]
    if not spliceable(message):
        return None
    decoded = json_loads(channel.decode_body(message["body"], props["body_encoding"]))
    with_slots = {
        **message,
        "body": slot("body"),
        "headers": {
            **{k: slot("id") if v == PROBE_ID else v for k, v in headers.items()},  # id, root_id
            "argsrepr": slot("argsrepr"),
        },
        "properties": {
            **{k: slot("id") if v == PROBE_ID else v for k, v in props.items()},  # correlation_id
            "delivery_tag": slot("tag"),
        },
    }
    template = Template(
        envelope=format_string(with_slots),
        body=format_string([slot("args"), *decoded[1:]]),
        # The same two steps as kombu's Redis `_put`: priority 0 is the plain queue name.
        key=channel._q_for_pri(queue, channel._get_message_priority(message, reverse=False)),
        expire_keys=tuple(channel._q_for_pri(queue, p) for p in channel.priority_steps),
        expire_ms=channel._expires.get(queue),
        encode_body=lambda text: channel.encode_body(text, props["body_encoding"])[0],
        repr_maxlen=app.amqp.argsrepr_maxsize,
        repr_maxlevels=app.conf.task_repr_maxlevels,
    )
    again = template.stamp(PROBE_ID, *PROBE_ARGS, tag=props["delivery_tag"])
    return template if again == json_dumps(message) else None


def bulk_publisher(app: Any) -> Publish:
    """Like ``celery_publisher``; on a Redis broker, one LPUSH per chunk of messages."""
    conn = app.connection_for_write()
    if conn.transport_cls not in REDIS_TRANSPORTS:
        conn.release()
        return celery_publisher(app)
    chosen: list[Publish] = []

    def publish(messages: Sequence[Message]) -> None:
        if not messages:
            return
        if not chosen:  # the first chunk connects and takes the probe
            chosen.append(redis_pusher(app, conn) or celery_publisher(app))
        chosen[0](messages)

    return publish


def redis_pusher(app: Any, conn: Any) -> Publish | None:
    """Pushes of template copies, or None where copies would not be what send_task sends."""
    # Receivers of the publish signals expect a call per message (tracing, say, adds
    # per-message headers): they get send_task, and never see the probe.
    if any(s.has_listeners() for s in (before_task_publish, after_task_publish, task_sent)):
        log.info("publish signal receivers: one send_task per row")
        return None
    channel = conn.default_channel
    template = make_template(app, channel, *capture(app, channel))
    if template is None:
        log.warning("this broker setup is not bulk-publishable: one send_task per row")
        return None
    # kombu's own client (its URL parsing, TLS, unix socket, key prefix), kept for the
    # publisher's life: kombu makes a new one per publish.
    with channel.conn_or_acquire() as client:
        return partial(push, client, template)


def push(client: Any, template: Template, messages: Sequence[Message]) -> None:
    payloads = [template.stamp(*m) for m in messages]
    # LPUSH of many values == that many LPUSHes in order: workers BRPOP the first first.
    with client.pipeline(transaction=False) as pipe:
        pipe.lpush(template.key, *payloads)
        if template.expire_ms is not None:  # as kombu's `_put` does for an expiring queue
            for key in template.expire_keys:
                pipe.pexpire(key, template.expire_ms)
        pipe.execute()
