"""BatchStore against a real Redis: transitions, counters, completion exactly once."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import redis as redis_lib

from worker.state import BatchStore, FinishVerdict, StartVerdict


def make_batch(client: redis_lib.Redis, bid: str, n_valid: int, n_rejected: int = 0) -> BatchStore:
    store = BatchStore(client)
    assert store.create(bid, {"provider": "local", "output": "/tmp/x"}, 0.0)
    rows = [(i, json.dumps({"spec": {"id": f"r{i}"}}), "queued", None) for i in range(n_valid)]
    rows += [
        (
            n_valid + i,
            json.dumps({"rejected": True, "id": f"bad{i}"}),
            "failed",
            json.dumps({"status": "failed"}),
        )
        for i in range(n_rejected)
    ]
    store.add_rows(bid, rows)
    return store


def test_create_refuses_an_existing_batch(redis_client: redis_lib.Redis) -> None:
    store = make_batch(redis_client, "b1", 1)
    assert not store.create("b1", {"output": "/tmp/y"}, 0.0)


def test_counts_follow_transitions_and_completion_fires_once(redis_client: redis_lib.Redis) -> None:
    store = make_batch(redis_client, "b", 3, n_rejected=1)
    assert store.counts("b")["queued"] == 3
    assert store.counts("b")["failed"] == 1
    assert store.seal("b", 4) is False
    start = store.adopt("b", 0, "t0", "w1", 60)
    assert start.verdict is StartVerdict.RUN and start.attempts == 1
    assert store.counts("b")["running"] == 1
    assert (
        store.finish("b", 0, "succeeded", {"status": "succeeded"}, cost_usd=0.5)
        is FinishVerdict.RECORDED
    )
    # a second finish of the same row (a redelivered message) changes nothing
    assert store.finish("b", 0, "failed", {"status": "failed"}) is FinishVerdict.ALREADY_TERMINAL
    assert store.adopt("b", 0, "t1", "w1", 60).verdict is StartVerdict.ALREADY_TERMINAL
    store.adopt("b", 1, "t0", "w1", 60)
    assert store.finish("b", 1, "failed", {"status": "failed"}) is FinishVerdict.RECORDED
    store.adopt("b", 2, "t0", "w1", 60)
    assert (
        store.finish("b", 2, "succeeded", {"status": "succeeded"}) is FinishVerdict.BATCH_COMPLETE
    )
    assert store.meta("b")["status"] == "finalizing"
    counts = store.counts("b")
    assert counts == {
        "queued": 0,
        "running": 0,
        "succeeded": 2,
        "failed": 2,
        "canceled": 0,
        "skipped": 0,
    }
    assert float(store.meta("b")["cost_usd"]) == 0.5


def test_seal_completes_a_batch_whose_rows_all_finished(redis_client: redis_lib.Redis) -> None:
    store = make_batch(redis_client, "c", 0, n_rejected=2)
    assert store.seal("c", 2) is True
    assert store.meta("c")["status"] == "finalizing"


def test_rows_finishing_before_seal_do_not_complete_early(redis_client: redis_lib.Redis) -> None:
    store = make_batch(redis_client, "d", 1)
    store.adopt("d", 0, "t", "w1", 60)
    assert store.finish("d", 0, "succeeded", {}) is FinishVerdict.RECORDED  # still submitting
    store.add_rows("d", [(1, "{}", "queued", None)])
    assert store.seal("d", 2) is False
    store.adopt("d", 1, "t", "w1", 60)
    assert store.finish("d", 1, "succeeded", {}) is FinishVerdict.BATCH_COMPLETE


def test_concurrent_finishes_complete_exactly_once(redis_client: redis_lib.Redis) -> None:
    n = 200
    store = make_batch(redis_client, "e", n)
    store.seal("e", n)

    def finish_twice(i: int) -> list[FinishVerdict]:
        store.adopt("e", i, "t", "w1", 60)
        return [store.finish("e", i, "succeeded", {}) for _ in range(2)]

    with ThreadPoolExecutor(8) as pool:
        verdicts = [v for pair in pool.map(finish_twice, range(n)) for v in pair]
    assert verdicts.count(FinishVerdict.BATCH_COMPLETE) == 1
    assert verdicts.count(FinishVerdict.ALREADY_TERMINAL) == n
    assert store.counts("e")["succeeded"] == n


def test_release_and_requeue(redis_client: redis_lib.Redis) -> None:
    store = make_batch(redis_client, "f", 1)
    store.seal("f", 1)
    store.adopt("f", 0, "t", "w1", 60)
    store.release("f", 0)
    assert store.counts("f")["queued"] == 1 and store.counts("f")["running"] == 0
    assert store.adopt("f", 0, "t", "w1", 60).attempts == 2
    store.finish("f", 0, "failed", {"status": "failed"})
    assert store.requeue_failed("f", 0)
    assert store.meta("f")["status"] == "open"
    assert store.counts("f")["queued"] == 1
    assert not store.requeue_failed("f", 0)
    rec = next(store.records("f", 1))
    assert rec.state == "queued" and rec.result is None and rec.attempts == 0
    assert store.started_at("f", 0) is None


def test_provider_queue_counts_running_rows_waiting_in_a_provider_queue(
    redis_client: redis_lib.Redis,
) -> None:
    from producer.runner import provider_queue

    store = make_batch(redis_client, "q", 4)
    store.seal("q", 4)
    for index in range(3):
        store.adopt("q", index, "t", "w1", 60)
    store.save_provider_memory("q", 0, {"state": "IN_QUEUE", "queue_position": 7})
    store.save_provider_memory("q", 1, {"state": "IN_QUEUE", "queue_position": 2})
    store.save_provider_memory("q", 2, {"state": "IN_PROGRESS", "queue_position": None})
    store.save_provider_memory("q", 3, {"state": "IN_QUEUE", "queue_position": 99})  # between steps
    assert provider_queue(store, "q") == (3, 99)
    store.finish("q", 3, "failed", {})
    store.finish("q", 0, "succeeded", {})
    store.finish("q", 1, "succeeded", {})
    assert provider_queue(store, "q") is None


def test_a_row_held_by_a_live_process_is_not_taken_by_another(
    redis_client: redis_lib.Redis,
) -> None:
    store = make_batch(redis_client, "h", 2)
    assert store.adopt("h", 0, "t", "w1", 60).verdict is StartVerdict.RUN
    refused = store.adopt("h", 0, "t", "w2", 60)
    assert refused.verdict is StartVerdict.HELD
    assert store.adopt("h", 0, "t", "w1", 60).attempts == 2  # its holder may take it again
    assert next(store.records("h", 1)).attempts == 2  # the refusal counted nothing
    # A lapsed lease is no hold: the next process takes the row.
    assert store.adopt("h", 1, "t", "w1", 0.05).verdict is StartVerdict.RUN
    time.sleep(0.1)
    assert store.adopt("h", 1, "t", "w2", 60).verdict is StartVerdict.RUN


def test_heartbeat_keeps_leases_and_reports_rows_taken_over(
    redis_client: redis_lib.Redis,
) -> None:
    store = make_batch(redis_client, "hb", 3)
    for index in range(3):
        store.adopt("hb", index, "t", "w1", 0.3)
    time.sleep(0.15)
    assert store.heartbeat("hb", [0, 1, 2], "w1", 0.3) == []  # pushed on: 0.3 s from now
    time.sleep(0.2)  # past the first lease, within the pushed one
    assert store.claim_lapsed("hb", reclaim_s=60) == []
    time.sleep(0.2)
    assert sorted(store.claim_lapsed("hb", reclaim_s=60)) == [0, 1, 2]
    assert store.counts("hb")["queued"] == 3 and store.counts("hb")["running"] == 0
    assert store.claim_lapsed("hb", reclaim_s=60) == []  # one watchdog takes each row
    assert sorted(store.heartbeat("hb", [0, 1, 2], "w1", 60)) == [0, 1, 2]  # w1 lost them
    assert store.adopt("hb", 0, "t", "w2", 60).verdict is StartVerdict.RUN


def test_release_with_a_token_only_hands_back_a_row_still_held(
    redis_client: redis_lib.Redis,
) -> None:
    store = make_batch(redis_client, "rl", 1)
    store.adopt("rl", 0, "t", "w1", 60)
    assert not store.release("rl", 0, "w2")
    assert store.counts("rl")["running"] == 1
    assert store.release("rl", 0, "w1")
    assert store.counts("rl")["queued"] == 1
    assert store.adopt("rl", 0, "t", "w2", 60).verdict is StartVerdict.RUN


def test_finish_ends_the_hold_and_done_batches_leave_the_live_set(
    redis_client: redis_lib.Redis,
) -> None:
    store = make_batch(redis_client, "lv", 1)
    assert "lv" in store.live_batches()
    store.adopt("lv", 0, "t", "w1", 0.05)
    store.finish("lv", 0, "succeeded", {})
    time.sleep(0.1)
    assert store.claim_lapsed("lv", reclaim_s=60) == []  # finished rows have no lease
    store.retire("lv")
    assert "lv" not in store.live_batches()


def test_stalled_for_measures_from_the_first_sighting(redis_client: redis_lib.Redis) -> None:
    store = make_batch(redis_client, "st", 1)
    assert store.stalled_for("st", 100.0) == 0.0
    assert store.stalled_for("st", 130.0) == 30.0
    assert store.stalled_for("st", None) == 0.0
    assert store.stalled_for("st", 140.0) == 0.0
