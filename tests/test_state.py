"""BatchStore against a real Redis: transitions, counters, completion exactly once."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import redis as redis_lib

from worker.state import BatchStore, FinishVerdict, SaveVerdict, StartVerdict


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
    taken = store.adopt("f", 0, "t", "w1", 60)
    assert store.release("f", 0, taken.epoch)
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
    memories = [
        {"state": "IN_QUEUE", "queue_position": 7},
        {"state": "IN_QUEUE", "queue_position": 2},
        {"state": "IN_PROGRESS", "queue_position": None},
        {"state": "IN_QUEUE", "queue_position": 99},  # row 3 is queued again, between steps
    ]
    for index, memory in enumerate(memories):
        epoch = store.adopt("q", index, "t", "w1", 60).epoch
        verdict = store.save_provider_memory("q", index, json.dumps(memory), epoch=epoch,
                                             based_on="", lease_s=60)  # fmt: skip
        assert verdict is SaveVerdict.SAVED
    assert store.release("q", 3, store.epoch("q", 3))
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
    beat = store.heartbeat("hb", [0, 1, 2], "w1", 0.3)  # pushed on: 0.3 s from now
    assert beat.renewed == {0, 1, 2} and beat.lost == set()
    time.sleep(0.2)  # past the first lease, within the pushed one
    assert store.claim_lapsed("hb", reclaim_s=60) == []
    time.sleep(0.2)
    assert sorted(store.claim_lapsed("hb", reclaim_s=60)) == [0, 1, 2]
    assert store.counts("hb")["queued"] == 3 and store.counts("hb")["running"] == 0
    assert store.claim_lapsed("hb", reclaim_s=60) == []  # one watchdog takes each row
    beat = store.heartbeat("hb", [0, 1, 2], "w1", 60)
    assert beat.lost == {0, 1, 2} and beat.renewed == set()  # w1 lost them
    assert store.adopt("hb", 0, "t", "w2", 60).verdict is StartVerdict.RUN


def test_release_only_hands_back_a_row_still_held_at_that_epoch(
    redis_client: redis_lib.Redis,
) -> None:
    store = make_batch(redis_client, "rl", 1)
    epoch = store.adopt("rl", 0, "t", "w1", 60).epoch
    assert not store.release("rl", 0, epoch - 1)
    assert store.counts("rl")["running"] == 1
    assert store.release("rl", 0, epoch)
    assert store.counts("rl")["queued"] == 1
    assert not store.release("rl", 0, epoch)  # a second hand-back of the same hold
    assert store.adopt("rl", 0, "t", "w2", 60).verdict is StartVerdict.RUN


# -- fencing: every change of hands moves the epoch on; stale writes are refused -----------


def test_a_save_and_a_renewal_push_the_holders_lease_on(redis_client: redis_lib.Redis) -> None:
    store = make_batch(redis_client, "rn", 1)
    epoch = store.adopt("rn", 0, "t", "w1", 0.2).epoch
    time.sleep(0.12)
    assert store.renew("rn", 0, epoch, 0.2)
    time.sleep(0.12)  # past the adopt's lease, within the renewal's
    assert store.save_provider_memory("rn", 0, "{}", epoch=epoch, based_on="", lease_s=0.2) is (
        SaveVerdict.SAVED
    )
    time.sleep(0.12)
    assert store.claim_lapsed("rn", reclaim_s=60) == []
    time.sleep(0.15)
    assert store.claim_lapsed("rn", reclaim_s=60) == [0]
    assert not store.renew("rn", 0, epoch, 60)  # claimed: that hold is over


def test_every_change_of_hands_moves_the_epoch_on(redis_client: redis_lib.Redis) -> None:
    store = make_batch(redis_client, "ep", 1)
    store.seal("ep", 1)
    seen = [store.epoch("ep", 0)]
    seen.append(store.adopt("ep", 0, "t", "w1", 0.05).epoch)
    assert store.epoch("ep", 0) == seen[-1]
    time.sleep(0.1)
    assert store.claim_lapsed("ep", reclaim_s=60) == [0]  # the lease lapsed
    seen.append(store.epoch("ep", 0))
    seen.append(store.adopt("ep", 0, "t", "w2", 60).epoch)
    assert store.release("ep", 0, seen[-1])  # a hand-back
    seen.append(store.epoch("ep", 0))
    seen.append(store.adopt("ep", 0, "t", "w3", 60).epoch)
    assert store.finish("ep", 0, "failed", {}, epoch=seen[-1]) is FinishVerdict.BATCH_COMPLETE
    seen.append(store.epoch("ep", 0))
    assert store.requeue_failed("ep", 0)  # `bgswap retry`
    seen.append(store.epoch("ep", 0))
    assert seen == sorted(set(seen)) and len(seen) == 8  # strictly increasing


def test_a_stale_holder_can_neither_save_memory_nor_finish(
    redis_client: redis_lib.Redis,
) -> None:
    store = make_batch(redis_client, "st2", 1)
    store.seal("st2", 1)
    old = store.adopt("st2", 0, "t", "w1", 0.05).epoch
    saved = store.save_provider_memory(
        "st2", 0, '{"a": 1}', epoch=old, based_on="", lease_s=0.05
    )  # a save pushes the lease on, for as long again
    assert saved is SaveVerdict.SAVED
    time.sleep(0.1)
    assert store.claim_lapsed("st2", reclaim_s=60) == [0]
    taken = store.adopt("st2", 0, "t", "w2", 60)
    assert taken.verdict is StartVerdict.RUN
    new = taken.epoch
    # the frozen first holder comes back: each of its writes is refused, nothing changes
    stale = store.save_provider_memory("st2", 0, "{}", epoch=old, based_on='{"a": 1}', lease_s=60)
    assert stale is SaveVerdict.STALE
    assert store.finish("st2", 0, "succeeded", {}, epoch=old) is FinishVerdict.STALE
    assert not store.renew("st2", 0, old, 60) and store.renew("st2", 0, new, 60)
    assert store.provider_memory("st2", 0) == {"a": 1}
    assert store.counts("st2")["running"] == 1
    assert store.heartbeat("st2", [0], "w2", 60).renewed == {0}  # w2's lease is untouched
    # the holder's own writes go through, over what it read
    changed = store.save_provider_memory("st2", 0, "{}", epoch=new, based_on="", lease_s=60)
    assert changed is SaveVerdict.CHANGED  # it did not base its write on what is stored
    assert store.save_provider_memory(
        "st2", 0, "{}", epoch=new, based_on='{"a": 1}', lease_s=60
    ) is (SaveVerdict.SAVED)
    assert store.finish("st2", 0, "succeeded", {}, epoch=new) is FinishVerdict.BATCH_COMPLETE


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
