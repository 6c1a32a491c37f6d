"""Range locks: user writes share, sync chunks exclude overlapping writes and each other."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hastpy.rangelock import LockKind, RangeLocks

REG, SYNC = LockKind.REGULAR, LockKind.SYNC


def test_overlapping_user_writes_exclude_each_other():
    locks = RangeLocks()
    assert locks.try_lock(REG, 0, 100) is not None
    assert locks.try_lock(REG, 50, 100) is None
    assert locks.try_lock(REG, 100, 100) is not None
    assert len(locks) == 2


def test_sync_excludes_overlapping_regular_and_vice_versa():
    locks = RangeLocks()
    sync = locks.try_lock(SYNC, 100, 100)
    assert locks.try_lock(REG, 150, 10) is None
    assert locks.try_lock(REG, 0, 101) is None
    assert locks.try_lock(REG, 199, 5) is None
    locks.unlock(sync)
    write = locks.try_lock(REG, 150, 10)
    assert write is not None
    assert locks.try_lock(SYNC, 100, 100) is None
    locks.unlock(write)
    assert locks.try_lock(SYNC, 100, 100) is not None


def test_adjacent_ranges_do_not_conflict():
    locks = RangeLocks()
    locks.try_lock(SYNC, 100, 100)
    assert locks.try_lock(REG, 0, 100) is not None
    assert locks.try_lock(REG, 200, 100) is not None


def test_sync_chunks_exclude_each_other():
    locks = RangeLocks()
    assert locks.try_lock(SYNC, 0, 10) is not None
    assert locks.try_lock(SYNC, 5, 10) is None
    assert locks.try_lock(SYNC, 10, 10) is not None


def test_empty_range_never_conflicts():
    locks = RangeLocks()
    locks.try_lock(SYNC, 0, 100)
    assert locks.try_lock(REG, 50, 0) is not None
    assert not locks.is_locked(50, 0, SYNC)


def test_is_locked_by_kind():
    locks = RangeLocks()
    token = locks.try_lock(REG, 10, 10)
    assert locks.is_locked(15, 1, REG)
    assert not locks.is_locked(15, 1, SYNC)
    assert not locks.is_locked(20, 5, REG)
    locks.unlock(token)
    assert not locks.is_locked(15, 1, REG)
    assert len(locks) == 0


def test_tokens_are_distinct_even_for_equal_ranges():
    locks = RangeLocks()
    first = locks.try_lock(REG, 0, 10)
    locks.unlock(first)
    second = locks.try_lock(REG, 0, 10)
    assert second is not first and second == second and second != first
    assert locks.is_locked(0, 10, REG)
    locks.unlock(second)
    assert not locks.is_locked(0, 10, REG)


def test_double_unlock_is_a_bug():
    locks = RangeLocks()
    token = locks.try_lock(SYNC, 0, 10)
    locks.unlock(token)
    with pytest.raises(ValueError):
        locks.unlock(token)


@pytest.mark.parametrize("offset,length", [(-1, 1), (0, -1)])
def test_invalid_ranges(offset, length):
    locks = RangeLocks()
    with pytest.raises(ValueError):
        locks.try_lock(REG, offset, length)
    with pytest.raises(ValueError):
        locks.is_locked(offset, length, SYNC)


ops = st.lists(
    st.tuples(st.sampled_from([REG, SYNC, None]), st.integers(0, 20), st.integers(0, 8), st.integers()),
    max_size=60,
)


@given(ops)
def test_against_a_naive_model(steps):
    """Random locks and unlocks: a lock is granted exactly when no conflicting lock overlaps."""
    locks = RangeLocks()
    held = []
    for kind, offset, length, pick in steps:
        if kind is None:
            if held:
                token = held.pop(pick % len(held))
                locks.unlock(token)
            continue
        wanted = set(range(offset, offset + length))
        conflict = any(wanted & set(range(other.offset, other.offset + other.length)) for other in held)
        token = locks.try_lock(kind, offset, length)
        assert (token is None) == conflict
        if token is not None:
            held.append(token)
        assert len(locks) == len(held)
