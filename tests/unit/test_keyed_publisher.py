"""The worker's publisher of decisions and allowances: per topic and key in order, keys and
topics independent, a waiting record superseded by a newer one, failures logged once per
interval, revoked keys dropped, a stop bounded."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import pytest
from aiokafka.errors import NotEnoughReplicasError

from worker.limits import publisher as publisher_module
from worker.limits.publisher import KeyedPublisher, Outcome

DECISIONS, ALLOWANCES = "decisions", "allowances"


class Broker:
    """Records what landed; refuses the (topic, key) pairs in ``refusing`` (a partition below
    min ISR, an ACL missing on a topic)."""

    def __init__(self) -> None:
        self.landed: list[tuple[str, str, bytes]] = []
        self.refusing: set[tuple[str, str]] = set()
        self.attempts = 0

    async def send(self, topic: str, key: str, value: bytes) -> None:
        self.attempts += 1
        await asyncio.sleep(0)
        if (topic, key) in self.refusing:
            raise NotEnoughReplicasError()
        self.landed.append((topic, key, value))


async def test_a_refused_allowance_does_not_hold_back_the_same_keys_decisions() -> None:
    """Found by a review: with one queue per key, a stuck allowance held back the key's blocks."""
    broker = Broker()
    broker.refusing.add((ALLOWANCES, "hot"))
    publisher = KeyedPublisher(broker.send)
    publisher.submit([(ALLOWANCES, "hot", b"a1"), (DECISIONS, "hot", b"block")])
    await asyncio.sleep(0.1)
    assert broker.landed == [(DECISIONS, "hot", b"block")]
    assert publisher.waiting() == (1, 1)  # the allowance, retried on its own


async def test_a_newer_record_replaces_one_still_waiting_behind_the_one_in_flight() -> None:
    broker = Broker()
    broker.refusing.add((DECISIONS, "k"))
    publisher = KeyedPublisher(broker.send)
    publisher.submit([(DECISIONS, "k", b"v1")])  # being sent, refused
    await asyncio.sleep(0.01)
    publisher.submit([(DECISIONS, "k", b"v2"), (DECISIONS, "k", b"v3")])
    publisher.submit([(DECISIONS, "k", b"v4")])
    assert publisher.superseded == 2  # v2 and v3: a long outage holds two records per slot at most
    assert publisher.waiting() == (1, 2)
    broker.refusing.clear()
    await asyncio.wait_for(publisher.flush(), 5)
    # v1 was in flight: it lands first (it must not land after a newer one)
    assert [v for _, _, v in broker.landed] == [b"v1", b"v4"]
    assert publisher.published == {DECISIONS: 2}
    assert publisher.waiting() == (0, 0)


async def test_one_queued_record_is_counted_once() -> None:
    publisher = KeyedPublisher(Broker().send)
    publisher.submit([(DECISIONS, "k", b"v")])
    assert publisher.waiting() == (1, 1)
    await asyncio.sleep(0)  # its sender has taken it
    assert publisher.waiting() == (1, 1)
    await asyncio.wait_for(publisher.flush(), 5)
    assert publisher.waiting() == (0, 0)


async def test_failures_are_logged_once_per_interval_with_what_waits(caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker()
    broker.refusing.update((DECISIONS, f"k{i}") for i in range(50))
    publisher = KeyedPublisher(broker.send, log_interval_s=60)
    publisher.submit([(DECISIONS, f"k{i}", b"d") for i in range(50)])
    with caplog.at_level(logging.WARNING, logger="worker.limits.publisher"):
        await asyncio.sleep(0.5)  # 50 keys, each refused about three times (0.2 s, then 0.4 s backoff)
        assert broker.attempts >= 100
        broker.refusing.clear()
        await asyncio.wait_for(publisher.flush(), 5)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    recoveries = [r for r in caplog.records if "landed" in r.getMessage()]
    assert len(failures) == 1
    assert len(recoveries) == 1
    assert "50 records of 50 keys waiting" in failures[0].getMessage()
    assert len(broker.landed) == 50


async def test_revoked_keys_are_dropped_and_no_longer_retried(caplog: pytest.LogCaptureFixture) -> None:
    """Found by a review: the old owner kept retrying for hours, and its older record could
    land after the new owner's newer one (the compacted topic then keeps the older)."""
    broker = Broker()
    broker.refusing.update({(DECISIONS, "gone"), (DECISIONS, "kept")})
    revoked: set[str] = set()
    publisher = KeyedPublisher(broker.send, owns=lambda key: key not in revoked)
    publisher.submit([(DECISIONS, "gone", b"old"), (DECISIONS, "kept", b"mine")])
    await asyncio.sleep(0.05)
    publisher.submit([(DECISIONS, "gone", b"newer, waiting")])
    revoked.add("gone")
    with caplog.at_level(logging.WARNING, logger="worker.limits.publisher"):
        await publisher.forget()
    assert "2 decision/allowance records of keys whose partitions were revoked dropped" in caplog.text
    attempts = broker.attempts
    broker.refusing.clear()
    await asyncio.wait_for(publisher.flush(), 5)
    assert broker.landed == [(DECISIONS, "kept", b"mine")]
    assert broker.attempts == attempts + 1  # only the kept key tried again
    assert publisher.forgotten == 2


async def test_a_first_attempt_refused_after_the_revoke_is_not_retried() -> None:
    """Found by a review: ``forget`` left a first attempt in flight alone, and when it was
    refused it was retried for ever; ownership is now checked before each retry."""
    owned = {"gone": True}
    attempts = 0

    async def send(topic: str, key: str, value: bytes) -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(0.05)  # the Kafka client holds a refused send up to its request timeout
        raise NotEnoughReplicasError()

    publisher = KeyedPublisher(send, owns=lambda key: owned[key])
    publisher.submit([(DECISIONS, "gone", b"old")])
    await asyncio.sleep(0.01)
    owned["gone"] = False
    await publisher.forget()  # nothing waits nor retries yet
    publisher.submit([(DECISIONS, "gone", b"queued behind it")])
    await asyncio.sleep(0.3)
    assert attempts == 1
    assert publisher.waiting() == (0, 0)
    assert publisher.forgotten == 2


async def test_a_stop_gives_up_within_its_bound_and_says_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker()
    broker.refusing.add((DECISIONS, "stuck"))
    publisher = KeyedPublisher(broker.send)
    publisher.submit([(DECISIONS, "stuck", b"d1"), (DECISIONS, "ok", b"d")])
    await asyncio.sleep(0)
    publisher.submit([(DECISIONS, "stuck", b"d2")])
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker.limits.publisher"):
        await publisher.close(0.3)
        publisher.submit([(DECISIONS, "late", b"after the stop")])
    assert 0.3 <= time.monotonic() - started < 2
    assert broker.landed == [(DECISIONS, "ok", b"d")]
    assert "2 decision/allowance records of 1 keys not published" in caplog.text
    assert "1 decision/allowance records decided after the stop not published" in caplog.text
    attempts = broker.attempts
    await asyncio.sleep(0.5)
    assert broker.attempts == attempts  # nothing retries after the stop, nothing starts
    assert publisher.waiting() == (0, 0)


async def test_each_record_has_an_outcome_a_caller_can_pace_on() -> None:
    """The fast lane waits (bounded) for its records' outcomes: True once landed, False as soon
    as a record never will be sent, so it is never held for a record that cannot land."""
    broker = Broker()
    broker.refusing.add((DECISIONS, "stuck"))
    publisher = KeyedPublisher(broker.send, owns=lambda key: key != "revoked")
    landed, stuck = publisher.submit([(DECISIONS, "ok", b"d"), (DECISIONS, "stuck", b"v1")])
    await asyncio.sleep(0.01)  # v1 in flight, refused, retried
    replaced, newest = publisher.submit([(DECISIONS, "stuck", b"v2"), (DECISIONS, "stuck", b"v3")])
    assert await asyncio.wait_for(landed, 1) is True
    assert replaced.done()
    assert replaced.result() is False  # superseded by v3 while waiting
    assert not stuck.done()
    assert not newest.done()
    await publisher.close(0.3)
    assert stuck.result() is False  # in flight at the stop
    assert newest.result() is False  # waiting at the stop
    (after,) = publisher.submit([(DECISIONS, "ok", b"late")])
    assert after.result() is False


async def test_records_dropped_at_a_revoke_have_their_outcome_at_once() -> None:
    broker = Broker()
    broker.refusing.update({(DECISIONS, "retried"), (DECISIONS, "first")})
    owned = {"retried": True, "first": True, "queued": True}
    publisher = KeyedPublisher(broker.send, owns=lambda key: owned[key])
    (retried,) = publisher.submit([(DECISIONS, "retried", b"v1")])
    await asyncio.sleep(0.01)  # refused once: retried
    (queued,) = publisher.submit([(DECISIONS, "retried", b"v2")])
    owned["retried"] = False
    await publisher.forget()
    assert retried.result() is False  # its retries stopped
    assert queued.result() is False  # dropped while waiting
    (first,) = publisher.submit([(DECISIONS, "first", b"v")])
    owned["first"] = False  # revoked while its first attempt is in flight, then refused
    await asyncio.sleep(0.05)
    assert first.result() is False
    assert publisher.waiting() == (0, 0)


NOTIFICATIONS = "notifications"


async def test_without_superseding_every_record_of_a_key_lands_in_order() -> None:
    """Notifications: each must be delivered, none replaced by a newer one of its key."""
    broker = Broker()
    broker.refusing.add((NOTIFICATIONS, "k"))
    publisher = KeyedPublisher(broker.send, supersede=False, what="notifications")
    publisher.submit([(NOTIFICATIONS, "k", b"50%")])  # in flight, refused
    await asyncio.sleep(0.01)
    outcomes = publisher.submit([(NOTIFICATIONS, "k", b"80%"), (NOTIFICATIONS, "k", b"100%")])
    assert publisher.superseded == 0
    assert publisher.waiting() == (1, 3)
    broker.refusing.clear()
    await asyncio.wait_for(publisher.flush(), 5)
    assert [v for _, _, v in broker.landed] == [b"50%", b"80%", b"100%"]
    assert [o.result() for o in outcomes] == [True, True]


async def test_without_superseding_a_revoked_keys_queue_is_dropped_whole(caplog: pytest.LogCaptureFixture) -> None:
    broker = Broker()
    broker.refusing.add((NOTIFICATIONS, "gone"))
    owned = {"gone": True}
    publisher = KeyedPublisher(broker.send, owns=lambda key: owned[key], supersede=False, what="notifications")
    (first,) = publisher.submit([(NOTIFICATIONS, "gone", b"n1")])
    await asyncio.sleep(0.01)  # refused once: retried
    queued = publisher.submit([(NOTIFICATIONS, "gone", b"n2"), (NOTIFICATIONS, "gone", b"n3")])
    owned["gone"] = False
    with caplog.at_level(logging.WARNING, logger="worker.limits.publisher"):
        await publisher.forget()
    assert "3 notifications of keys whose partitions were revoked dropped" in caplog.text
    assert [o.result() for o in [first, *queued]] == [False, False, False]
    assert publisher.waiting() == (0, 0)
    assert publisher.forgotten == 3


async def test_records_of_revoked_keys_get_one_attempt_before_the_revoke_lets_go() -> None:
    """``settle_disowned``: a revoke waits for the revoked keys' records to be tried once (so
    what lands is recorded before the next owner reads it); a refused one is not retried."""
    broker = Broker()
    broker.refusing.add((NOTIFICATIONS, "refused"))
    owned = {"lands": True, "refused": True, "kept": True}
    publisher = KeyedPublisher(broker.send, owns=lambda key: owned[key], supersede=False)
    lands, refused, _ = publisher.submit(
        [(NOTIFICATIONS, "lands", b"a"), (NOTIFICATIONS, "refused", b"b"), (NOTIFICATIONS, "kept", b"c")]
    )
    owned.update(lands=False, refused=False)
    await asyncio.wait_for(publisher.settle_disowned(), 2)
    assert lands.result() is True
    assert refused.result() is False
    assert broker.attempts == 3


async def test_a_retry_that_lands_as_its_key_is_revoked_is_not_counted_as_dropped() -> None:
    """Found by a review: ``forget`` counted every retrying record as dropped, one whose retry
    landed meanwhile too (then counted as published and as forgotten)."""
    refusing, owned, acked = True, {"k": True}, asyncio.Event()
    landed: list[bytes] = []

    async def send(topic: str, key: str, value: bytes) -> None:
        if refusing:
            raise NotEnoughReplicasError()
        await acked.wait()  # the retry's request is out; its ack comes back with the revoke
        landed.append(value)

    publisher = KeyedPublisher(send, owns=lambda key: owned[key], supersede=False)
    (outcome,) = publisher.submit([(NOTIFICATIONS, "k", b"x")])
    await asyncio.sleep(0.05)
    refusing = False
    await asyncio.sleep(0.3)  # retried: in flight
    owned["k"] = False
    acked.set()
    await publisher.forget()  # an attempt in flight is left to end
    assert await asyncio.wait_for(outcome, 1) is True
    assert landed == [b"x"]
    assert (publisher.published[NOTIFICATIONS], publisher.forgotten) == (1, 0)


class RetryAtTheRevoke:
    """Key k's record x refused once, then retried with its answer held until the test gives it
    at the moment of the revoke; later records of k take ``later_s`` each."""

    def __init__(self, two_hops: bool = False, later_s: float = 0.05) -> None:
        self.refusing = True
        self.owned = {"k": True}
        self.answer: asyncio.Future[None] | None = None
        self.two_hops = two_hops  # the answer through ``wait_for``, as aiokafka's requests
        self.later_s = later_s

    async def send(self, topic: str, key: str, value: bytes) -> None:
        if self.refusing:
            raise NotEnoughReplicasError()
        if value != b"x":
            await asyncio.sleep(self.later_s)
            return
        self.answer = asyncio.get_running_loop().create_future()
        await (asyncio.wait_for(self.answer, 5) if self.two_hops else self.answer)

    async def revoke_during_the_retry(self, values: list[bytes]) -> tuple[KeyedPublisher, list[Outcome]]:
        publisher = KeyedPublisher(self.send, owns=lambda key: self.owned[key], supersede=False)
        outcomes = publisher.submit([(NOTIFICATIONS, "k", v) for v in values])
        await asyncio.sleep(0.05)
        self.refusing = False
        while self.answer is None:
            await asyncio.sleep(0.01)
        self.owned["k"] = False
        return publisher, outcomes


async def test_a_retry_acked_as_the_revoke_settles_leaves_its_keys_next_record_its_attempt() -> None:
    """Found by a review: the retry landed between the settle's look at it and its cancel, and
    the cancel then cut the key's next record short, counted neither published nor dropped."""
    broker = RetryAtTheRevoke()
    publisher, (x, y) = await broker.revoke_during_the_retry([b"x", b"y"])
    settle = asyncio.create_task(publisher.settle_disowned())
    assert broker.answer is not None
    broker.answer.set_result(None)  # x's ack arrives in the same loop turn
    await asyncio.wait_for(settle, 2)
    assert (x.result(), y.result()) == (True, True)
    assert (publisher.published[NOTIFICATIONS], publisher.forgotten) == (2, 0)


async def test_a_retry_refused_as_the_revoke_settles_is_counted_once() -> None:
    """Found by a review: the settle counted a retry refused in its own turn, and so did the
    sender that dropped it."""
    broker = RetryAtTheRevoke()
    publisher, (x,) = await broker.revoke_during_the_retry([b"x"])
    settle = asyncio.create_task(publisher.settle_disowned())
    assert broker.answer is not None
    broker.answer.set_exception(NotEnoughReplicasError())  # refused in the same turn
    await asyncio.wait_for(settle, 2)
    assert x.result() is False
    assert publisher.forgotten == 1


async def test_a_slow_ack_of_a_retry_at_the_revoke_lands_and_the_next_record_gets_its_attempt() -> None:
    """Found by a review: the settle cancelled the sender after one loop turn; an ack two turns
    away (aiokafka's requests go through ``wait_for``) landed anyway and the late cancel cut the
    key's next record, counted nowhere. Attempts in flight are no longer cancelled."""
    broker = RetryAtTheRevoke(two_hops=True, later_s=0.2)
    publisher, (x, y) = await broker.revoke_during_the_retry([b"x", b"y"])
    settle = asyncio.create_task(publisher.settle_disowned())
    assert broker.answer is not None
    broker.answer.set_result(None)
    await asyncio.wait_for(settle, 3)
    assert (x.result(), y.result()) == (True, True)
    assert (publisher.published[NOTIFICATIONS], publisher.forgotten) == (2, 0)


async def test_a_revoke_does_not_wait_out_a_retry_delay() -> None:
    broker = Broker()
    broker.refusing.add((NOTIFICATIONS, "k"))
    owned = {"k": True}
    publisher = KeyedPublisher(broker.send, owns=lambda key: owned[key], retry_max_s=60, supersede=False)
    (x,) = publisher.submit([(NOTIFICATIONS, "k", b"x")])
    await asyncio.sleep(1.0)  # refused 4 times: now 1.6 s before the next try
    attempts = broker.attempts
    owned["k"] = False
    await asyncio.wait_for(publisher.settle_disowned(), 0.2)
    assert x.result() is False
    assert (broker.attempts, publisher.forgotten, publisher.waiting()) == (attempts, 1, (0, 0))


class HeldAnswer:
    """Each record's send waits for its answer; ``answer_then`` answers the first record sent
    when the stop starts cancelling (the ack back in the turn the stop's time runs out)."""

    def __init__(self) -> None:
        self.answers: list[asyncio.Future[None]] = []

    async def send(self, topic: str, key: str, value: bytes) -> None:
        answer = asyncio.get_running_loop().create_future()
        self.answers.append(answer)
        await answer

    def answer_then(self, cancel: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        async def answered_then_cancel(*tasks: asyncio.Task[None]) -> None:
            self.answers[0].set_result(None)
            await cancel(*tasks)

        return answered_then_cancel


class AlwaysRefused:
    def __init__(self, answer_s: float = 0.0) -> None:
        self.attempts = 0
        self.answer_s = answer_s

    async def send(self, topic: str, key: str, value: bytes) -> None:
        self.attempts += 1
        await asyncio.sleep(self.answer_s)
        raise NotEnoughReplicasError()


async def test_a_revoke_stops_a_retry_for_good_even_if_the_key_is_owned_again_meanwhile() -> None:
    """Found by a review: a key owned again before its woken sender ran went back to retrying,
    and ``forget`` waited on it for as long as the broker refused."""
    broker, owned = AlwaysRefused(), {"k": True}
    publisher = KeyedPublisher(broker.send, owns=lambda key: owned[key], retry_max_s=2)
    (x,) = publisher.submit([(DECISIONS, "k", b"x")])
    await asyncio.sleep(0.5)
    owned["k"] = False
    forget = asyncio.create_task(publisher.forget())
    await asyncio.sleep(0)  # the delay is ended; its sender has not run yet
    owned["k"] = True
    await asyncio.wait_for(forget, 1)
    assert (x.result(), publisher.forgotten, publisher.waiting()) == (False, 1, (0, 0))


async def test_a_retry_whose_delay_ran_out_as_the_revoke_came_is_dropped_before_forget_returns() -> None:
    """Found by a review: a sender whose delay had just run out was neither waited for nor
    counted by ``forget``; it dropped its record a turn later, unlogged."""
    broker, owned = AlwaysRefused(), {"k": True}
    publisher = KeyedPublisher(broker.send, owns=lambda key: owned[key], retry_max_s=60)
    (x,) = publisher.submit([(DECISIONS, "k", b"x")])
    await asyncio.sleep(0.1)
    for delay in publisher._delays.values():
        delay.set_result(None)  # runs out in this turn, as its timer would
    owned["k"] = False
    await publisher.forget()
    assert (x.done(), publisher.forgotten, publisher.waiting()) == (True, 1, (0, 0))


async def test_a_stop_counts_each_record_left_once() -> None:
    """Found by a review: the stop counted what was left, then cancelled the senders a loop turn
    later; a record that landed, or was dropped by its own sender, in that turn counted twice."""
    owned = {"k": True}
    publisher = KeyedPublisher(AlwaysRefused().send, owns=lambda key: owned[key])
    (x,) = publisher.submit([(DECISIONS, "k", b"x")])
    await asyncio.sleep(0.1)  # asleep before its next try
    owned["k"] = False  # revoked, and its delay runs out as the stop's time does
    for delay in publisher._delays.values():
        delay.set_result(None)
    await publisher.close(0)
    assert (x.result(), publisher.forgotten) == (False, 1)

    held = HeldAnswer()
    publisher = KeyedPublisher(held.send)
    (y,) = publisher.submit([(DECISIONS, "k", b"y")])
    await asyncio.sleep(0.01)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(publisher_module, "cancel_all_and_wait", held.answer_then(publisher_module.cancel_all_and_wait))
        await publisher.close(0.05)  # the ack comes back as the stop's time runs out
    assert (y.result(), publisher.published[DECISIONS], publisher.forgotten) == (True, 1, 0)


async def test_a_record_submitted_once_the_key_is_owned_again_is_not_dropped_by_the_stopped_sender() -> None:
    """Found by a review: the stopped sender dropped its whole queue, a record decided after the
    key was owned again included."""
    owned = {"k": True}
    attempts: list[bytes] = []

    async def send(topic: str, key: str, value: bytes) -> None:
        attempts.append(value)
        await asyncio.sleep(0)
        if value == b"old":
            raise NotEnoughReplicasError()

    publisher = KeyedPublisher(send, owns=lambda key: owned[key], retry_max_s=60)
    (old,) = publisher.submit([(DECISIONS, "k", b"old")])
    await asyncio.sleep(0.1)  # old refused, asleep before its retry
    owned["k"] = False
    forget = asyncio.create_task(publisher.forget())
    await asyncio.sleep(0)  # k's retries stopped; its sender has not run yet
    owned["k"] = True
    (new,) = publisher.submit([(DECISIONS, "k", b"new")])  # decided by this worker, owning k again
    await asyncio.wait_for(forget, 1)
    await asyncio.wait_for(publisher.flush(), 1)
    assert old.result() is False  # the stop holds for the retried record
    assert new.result() is True, f"attempts: {attempts}, forgotten: {publisher.forgotten}"
    assert (publisher.published[DECISIONS], publisher.forgotten) == (1, 1)


async def test_forget_says_only_what_it_stopped(caplog: pytest.LogCaptureFixture) -> None:
    """Found by a review: forget said every record dropped while it waited, another sender's
    refusal (logged by that sender) included."""
    owned = {"a": True, "b": True}
    answer: dict[str, asyncio.Future[None]] = {}

    async def send(topic: str, key: str, value: bytes) -> None:
        if key == "a":
            await asyncio.sleep(0)
            raise NotEnoughReplicasError()
        answer[key] = asyncio.get_running_loop().create_future()
        await answer[key]

    publisher = KeyedPublisher(send, owns=lambda key: owned[key], retry_max_s=60)
    (a,) = publisher.submit([(DECISIONS, "a", b"a1")])
    await asyncio.sleep(0.1)  # a: asleep before its retry
    (b,) = publisher.submit([(DECISIONS, "b", b"b1")])
    await asyncio.sleep(0)  # b: its first attempt in flight
    owned.update(a=False, b=False)
    with caplog.at_level(logging.WARNING, logger="worker.limits.publisher"):
        forget = asyncio.create_task(publisher.forget())
        await asyncio.sleep(0)
        answer["b"].set_exception(NotEnoughReplicasError())  # b refused while forget waits on a
        await forget
    assert (a.result(), b.result(), publisher.forgotten) == (False, False, 2)
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "1 keys' decision/allowance records dropped unpublished" in said[0]  # b, by its sender
    assert (
        "1 decision/allowance records of keys whose partitions were revoked dropped unpublished (1 being retried)"
        in said[1]
    ), said


async def test_a_revoke_does_not_wait_for_a_key_owned_again_meanwhile() -> None:
    """Found by a review: ``settle_disowned`` waited for every sender it had collected, also one
    of a key owned again, which the broker kept refusing: for ever."""
    owned = {"k": True}
    publisher = KeyedPublisher(AlwaysRefused(answer_s=0.05).send, owns=lambda key: owned[key], supersede=False)
    (x,) = publisher.submit([(NOTIFICATIONS, "k", b"x")])
    await asyncio.sleep(0)  # its first attempt in flight
    owned["k"] = False
    settle = asyncio.create_task(publisher.settle_disowned())
    await asyncio.sleep(0)  # the settle waits for its sender
    owned["k"] = True  # refused, but ours again: retried
    await asyncio.wait_for(settle, 1)
    assert not x.done()
    await publisher.close(0)


async def test_a_record_acked_as_the_stop_gives_up_is_not_said_unpublished(caplog: pytest.LogCaptureFixture) -> None:
    """Found by a review: the stop's warning counted what was left before cancelling it."""
    held = HeldAnswer()
    publisher = KeyedPublisher(held.send)
    publisher.submit([(DECISIONS, "k", b"acked late"), (DECISIONS, "other", b"never acked")])
    await asyncio.sleep(0.01)
    with pytest.MonkeyPatch.context() as patch, caplog.at_level(logging.WARNING, logger="worker.limits.publisher"):
        patch.setattr(publisher_module, "cancel_all_and_wait", held.answer_then(publisher_module.cancel_all_and_wait))
        await publisher.close(0.05)
    assert (publisher.published[DECISIONS], publisher.forgotten) == (1, 1)
    assert "1 decision/allowance records of 2 keys not published within 0.05s of the stop" in caplog.text


async def test_a_queue_kept_for_a_key_owned_again_as_the_stop_begins_is_settled_by_the_stop() -> None:
    """Found by a review: the stopped sender kept the queue of a key owned again, but the stop
    had begun, so no sender took it and the stop (finding no sender) left it unsettled."""
    owned = {"k": True}

    async def send(topic: str, key: str, value: bytes) -> None:
        await asyncio.sleep(0)
        if value == b"n1":
            raise NotEnoughReplicasError()

    publisher = KeyedPublisher(send, owns=lambda key: owned[key], retry_max_s=60, supersede=False)
    n1, n2 = publisher.submit([(NOTIFICATIONS, "k", b"n1"), (NOTIFICATIONS, "k", b"n2")])
    await asyncio.sleep(0.1)  # n1 refused, in its retry delay; n2 waits
    closing = asyncio.create_task(publisher.close(5))
    await asyncio.sleep(0)
    owned["k"] = False
    settle = asyncio.create_task(publisher.settle_disowned())
    await asyncio.sleep(0)
    owned["k"] = True
    await asyncio.wait_for(asyncio.gather(settle, closing), 6)
    assert (n1.result(), n2.result(), publisher.forgotten) == (False, False, 2)
    assert publisher.idle()
