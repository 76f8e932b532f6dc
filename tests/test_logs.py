"""The log formats: JSON lines with the row's fields, text lines, and the redaction that
both share (the end-to-end run with canary secrets is in tests/test_metrics.py)."""

from __future__ import annotations

import io
import json
import logging
import threading
import warnings

import pytest

from worker import logs

SECRET = 'k3y-with-"quote\\-and-backslash'


def emit(handler: logging.Handler, message: str, *args: object, exc: bool = False) -> None:
    logger = logging.getLogger("bgswap.test-logs")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if exc:
        try:
            raise RuntimeError(f"boom {SECRET}")
        except RuntimeError:
            logger.exception(message, *args)
    else:
        logger.warning(message, *args)


def json_handler(stream: io.StringIO) -> logging.Handler:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter([SECRET]))
    return handler


def test_a_json_line_names_the_row_and_its_provider_task() -> None:
    out = io.StringIO()
    handler = json_handler(out)
    with logs.row_context("b1", "sku-7", "runware"):
        emit(handler, "row %s: retry", "b1:7")
        logs.bind(provider_task_id="task-uuid-1", ignored=None)
        emit(handler, "polled")
    emit(handler, "outside any row")
    first, second, third = (json.loads(x) for x in out.getvalue().splitlines())
    assert first["message"] == "row b1:7: retry" and first["level"] == "warning"
    assert first["logger"] == "bgswap.test-logs" and first["ts"].endswith("+00:00")
    assert (first["batch_id"], first["row_id"], first["provider"]) == ("b1", "sku-7", "runware")
    assert "provider_task_id" not in first and "ignored" not in second
    assert second["provider_task_id"] == "task-uuid-1"
    assert "row_id" not in third and "batch_id" not in third


def test_the_row_context_is_each_threads_own() -> None:
    out = io.StringIO()
    handler = json_handler(out)
    started = threading.Event()
    release = threading.Event()

    def other() -> None:
        with logs.row_context("b2", "other-row", "fal"):
            started.set()
            release.wait(5)

    thread = threading.Thread(target=other)
    thread.start()
    started.wait(5)
    emit(handler, "main thread")
    release.set()
    thread.join(5)
    assert "row_id" not in json.loads(out.getvalue())


def test_secrets_are_redacted_before_encoding_in_messages_rows_and_tracebacks() -> None:
    out = io.StringIO()
    handler = json_handler(out)
    with logs.row_context("b1", f"row-{SECRET}", "fal"):
        emit(handler, "key %s in https://u:pw@h/p?X-Amz-Signature=abc", SECRET, exc=True)
    text = out.getvalue()
    entry = json.loads(text)
    assert "quote" not in text and "X-Amz-Signature" not in text and ":pw@" not in text
    assert entry["message"].startswith("key *** in https://")
    assert entry["row_id"] == "row-***"
    assert "RuntimeError: boom ***" in entry["exception"]


def test_text_lines_are_redacted_too() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.formatter("text", [SECRET]))
    emit(handler, "key %s", SECRET)
    assert out.getvalue().rstrip().endswith("bgswap.test-logs: key ***")
    assert "[" in out.getvalue().split("]")[0]  # Celery's own prefix shape


def test_secrets_are_found_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAL_KEY", "fal-key-value-1")
    monkeypatch.setenv("BGSWAP_CALLBACK_SECRET", "cb-secret-2")
    monkeypatch.setenv("BGSWAP_BROKER_URL", "amqp://user:broker-pw-3@mq:5672//")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-4")
    found = logs.secrets_from_env()
    assert {"fal-key-value-1", "cb-secret-2", "broker-pw-3", "aws-secret-4"} <= set(found)


def test_configure_sends_the_root_logger_and_python_warnings_through_one_format() -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure("json", logging.INFO, stream=out)
        logging.getLogger("celery.worker").info("ready")
        logging.getLogger("httpx").info("GET https://h/?sig=1")  # quieted: warnings only
        warnings.warn("running as root", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        root.handlers, root.level = saved
    entries = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [e["logger"] for e in entries] == ["celery.worker", "py.warnings"]
    assert "running as root" in entries[1]["message"]
