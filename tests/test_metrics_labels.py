"""The metrics' label values come from short fixed sets, whatever a manifest says, and the
outcome of a request is named from its status (the serving side is in test_metrics.py)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from worker import metrics


def finished(**labels: str) -> float:
    return REGISTRY.get_sample_value("bgswap_rows_finished_total", labels) or 0.0


def test_a_refused_rows_own_provider_and_odd_codes_never_become_label_values() -> None:
    before = finished(provider="other", status="failed", code="input.invalid_enum")
    odd = finished(provider="other", status="other", code="other")
    metrics.row_finished({"provider": "x<script>-" + "9" * 40, "status": "failed",
                          "error": {"code": "input.invalid_enum"}})  # fmt: skip
    metrics.row_finished({"provider": None, "status": "weird", "error": {"code": "Not A Code"}})
    assert finished(provider="other", status="failed", code="input.invalid_enum") == before + 1
    assert finished(provider="other", status="other", code="other") == odd + 1
    exposed = {
        value
        for metric in REGISTRY.collect()
        if metric.name == "bgswap_rows_finished"
        for sample in metric.samples
        for value in sample.labels.values()
    }
    assert not any("script" in v or "Not A Code" in v or "weird" in v for v in exposed)


def test_a_costly_success_counts_its_cost_under_its_provider() -> None:
    labels = {"provider": "fal"}
    cost = REGISTRY.get_sample_value("bgswap_cost_usd_total", labels) or 0.0
    ok = finished(provider="fal", status="succeeded", code="")
    metrics.row_finished({"provider": "fal", "status": "succeeded", "error": None,
                          "cost_usd": 0.09})  # fmt: skip
    assert finished(provider="fal", status="succeeded", code="") == ok + 1
    assert REGISTRY.get_sample_value("bgswap_cost_usd_total", labels) == cost + 0.09


def test_request_outcomes_and_provider_labels() -> None:
    assert [metrics.outcome_of(s) for s in (None, 200, 202, 404, 429, 500, 503)] == [
        "network", "ok", "ok", "client_error", "throttled", "server_error", "server_error"
    ]  # fmt: skip
    assert metrics.provider_label("Runware") == "runware"
    assert metrics.provider_label("fal storage") == "fal"
    throttled = REGISTRY.get_sample_value("bgswap_provider_throttled_total", {"provider": "fal"})
    metrics.request_done("fal storage", "upload", 429, 0.2)
    after = REGISTRY.get_sample_value("bgswap_provider_throttled_total", {"provider": "fal"})
    assert after == (throttled or 0.0) + 1


def test_series_names_are_the_families_bgswap_exposes() -> None:
    names = metrics.series_names()
    assert "bgswap_rows_finished_total" in names and "bgswap_rows_finished" not in names
    assert "bgswap_provider_request_duration_seconds" in names
    assert {"bgswap_provider_in_flight", "bgswap_queue_messages"} <= names
    assert all(n.startswith("bgswap_") for n in names)
