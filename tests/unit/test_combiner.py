"""hastpy.combiner: groups, leadership, hand-off and failures, with real threads."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from hastpy.combiner import Combiner

WAIT = 10.0  # bound on every wait below; a correct combiner needs milliseconds


class Recorder:
    """handle() that records its groups and checks that no two calls overlap."""

    def __init__(self, gate: threading.Event | None = None):
        self.groups: list[list] = []
        self.threads: list[str] = []
        self.failed: list[tuple[list, BaseException]] = []
        self.gate = gate
        self.entered = threading.Event()
        self._busy = threading.Lock()

    def handle(self, group):
        assert self._busy.acquire(blocking=False), "two handle() calls at once"
        try:
            self.groups.append(list(group))
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            if self.gate is not None:
                assert self.gate.wait(WAIT)
        finally:
            self._busy.release()

    def fail(self, group, exc):
        self.failed.append((list(group), exc))


def inline(fn):
    fn()


def test_a_lone_submit_is_handled_at_once_by_its_own_thread():
    r = Recorder()
    Combiner(r.handle, r.fail, inline, max_rounds=4).submit([1, 2])
    assert r.groups == [[1, 2]]
    assert r.threads == [threading.current_thread().name]


def test_items_queued_while_the_leader_handles_come_as_one_group_in_order():
    gate = threading.Event()
    r = Recorder(gate)
    c = Combiner(r.handle, r.fail, inline, max_rounds=4)
    leader = threading.Thread(target=c.submit, args=([1],), name="leader")
    leader.start()
    assert r.entered.wait(WAIT)
    for items in ([2], [3, 4], [5]):  # these return at once: the leader is busy
        t = threading.Thread(target=c.submit, args=(items,))
        t.start()
        t.join(WAIT)
        assert not t.is_alive()
    gate.set()
    leader.join(WAIT)
    assert r.groups == [[1], [2, 3, 4, 5]]
    assert r.threads == ["leader", "leader"]


def test_after_max_rounds_the_lead_is_handed_off():
    handed = []
    r = Recorder()

    def handle(group):  # each group queues the next item: the leader would never run dry
        r.handle(group)
        if group[0] < 5:
            c.submit([group[0] + 1])

    c = Combiner(handle, r.fail, handed.append, max_rounds=2)
    c.submit([1])
    assert r.groups == [[1], [2]]
    assert len(handed) == 1
    handed.pop()()  # whoever runs the continuation leads
    assert r.groups == [[1], [2], [3], [4]]
    handed.pop()()
    assert r.groups == [[1], [2], [3], [4], [5]]
    assert not handed  # the queue ran dry: leadership ended, no further hand-off
    c.submit([9])
    assert r.groups[-1] == [9]


def test_a_raising_handle_fails_its_group_and_leading_goes_on():
    r = Recorder()
    boom = RuntimeError("bug")
    seen = []

    def handle(group):
        seen.append(group)
        if group == [1]:
            c.submit([2])  # queued while the failing group is being handled
            raise boom

    c = Combiner(handle, r.fail, inline, max_rounds=4)
    c.submit([1])
    assert r.failed == [([1], boom)]
    assert seen == [[1], [2]]  # the queued item was not stranded
    c.submit([3])
    assert seen[-1] == [3]


def test_a_refused_hand_off_fails_what_waits_and_frees_the_lead():
    r = Recorder()

    def handle(group):
        r.handle(group)
        if group == [1]:
            c.submit([2])

    def closed_pool(_fn):
        raise RuntimeError("cannot schedule new futures after shutdown")

    c = Combiner(handle, r.fail, closed_pool, max_rounds=1)
    c.submit([1])
    assert r.groups == [[1]]
    assert [g for g, _ in r.failed] == [[2]]
    c.submit([3])  # nobody leads any more, so this thread does
    assert r.groups == [[1], [3]]


def test_max_rounds_must_be_positive():
    with pytest.raises(ValueError):
        Combiner(print, print, inline, max_rounds=0)


@pytest.mark.parametrize("max_rounds", [1, 3])
def test_many_threads_every_item_exactly_once_one_handle_at_a_time(max_rounds):
    r = Recorder()
    pool = ThreadPoolExecutor(2)
    c = Combiner(r.handle, r.fail, pool.submit, max_rounds)
    per_thread, threads_n = 300, 6

    def producer(k):
        rng = random.Random(k)
        n = 0
        while n < per_thread:
            size = min(rng.randrange(1, 5), per_thread - n)
            c.submit([(k, n + i) for i in range(size)])
            n += size

    threads = [threading.Thread(target=producer, args=(k,)) for k in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)

    def all_handled():
        return sum(len(g) for g in r.groups) == per_thread * threads_n

    pause = threading.Event()
    for _ in range(int(WAIT / 0.01)):  # a hand-off may still be running in the pool
        if all_handled():
            break
        pause.wait(0.01)
    pool.shutdown(wait=True)
    items = [item for g in r.groups for item in g]
    assert sorted(items) == sorted((k, n) for k in range(threads_n) for n in range(per_thread))
    for k in range(threads_n):  # each producer's items in the order it queued them
        mine = [n for kk, n in items if kk == k]
        assert mine == sorted(mine)
    assert not r.failed
