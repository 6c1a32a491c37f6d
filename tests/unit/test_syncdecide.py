"""The §7.2 decision table, row by row, and the primary's counter rules."""

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hastpy.errors import RemoteProtocolError
from hastpy.syncdecide import (
    REPLICA_MISMATCH_ERRMSG,
    RESUID_MISMATCH_ERRMSG,
    SPLIT_BRAIN_ERRMSG,
    SPLIT_BRAIN_LOG,
    STALE_SOURCE_ERRMSG,
    SYNCSRC_PRIMARY,
    SYNCSRC_SECONDARY,
    SYNCSRC_UNDEF,
    BitmapReply,
    Counters,
    Decision,
    Outcome,
    counters_after_sync,
    decide,
    is_decision_refusal,
    localcnt_after_write,
)

UID = 0x1234_5678_9ABC_DEF0
U64 = (1 << 64) - 1


def s(local, remote, resuid=UID):
    return Counters(resuid, local, remote)


p = s  # the primary's counters are built the same way


def test_syncsrc_wire_values():
    assert (SYNCSRC_UNDEF, SYNCSRC_PRIMARY, SYNCSRC_SECONDARY) == (0, 1, 2)


def test_messages_are_hastds():
    assert SPLIT_BRAIN_ERRMSG == "Split-brain condition!"
    assert SPLIT_BRAIN_LOG == "Split-brain detected, exiting."


@pytest.mark.parametrize("virgin,bitmap", [(True, BitmapReply.NONE), (False, BitmapReply.ALL_ONES)])
def test_row1_fresh_secondary_adopts_resuid(virgin, bitmap):
    d = decide(s(0, 0, resuid=0), p(3, 1), virgin)
    assert (d.outcome, d.syncsrc, d.bitmap) == (Outcome.ADOPT_RESUID, SYNCSRC_PRIMARY, bitmap)
    assert (d.adopt_resuid, d.reply_virgin, d.errmsg) == (UID, True, None)
    assert not d.refused


def test_row1_ignores_the_fresh_secondarys_counters():
    d = decide(s(7, 9, resuid=0), p(0, 0), True)
    assert d.outcome is Outcome.ADOPT_RESUID


def test_row2_resuid_mismatch():
    d = decide(s(1, 1, resuid=5), p(1, 1, resuid=18446744073709551615), False)
    assert d.outcome is Outcome.RESUID_MISMATCH
    assert d.errmsg == "Resource unique ID mismatch (primary=18446744073709551615, secondary=5)."
    assert d.errmsg == RESUID_MISMATCH_ERRMSG.format(primary=U64, secondary=5)
    assert d.refused
    assert d.exit_code == os.EX_CONFIG
    assert (d.syncsrc, d.bitmap, d.adopt_resuid) == (SYNCSRC_UNDEF, None, None)
    assert not d.reply_virgin


def test_row3_primary_out_of_date():
    d = decide(s(4, 2), p(2, 3), False)
    assert d == Decision(Outcome.SYNC_FROM_SECONDARY, SYNCSRC_SECONDARY, BitmapReply.ON_DISK)


@pytest.mark.parametrize("virgin", [False, True])
def test_row4_in_sync_still_exchanges_bitmap(virgin):
    d = decide(s(3, 2), p(2, 3), virgin)
    assert d == Decision(Outcome.IN_SYNC, SYNCSRC_PRIMARY, BitmapReply.ON_DISK)


def test_row5_secondary_out_of_date():
    d = decide(s(3, 2), p(5, 3), False)
    assert d == Decision(Outcome.SYNC_FROM_PRIMARY, SYNCSRC_PRIMARY, BitmapReply.ON_DISK)


def test_row6_split_brain():
    d = decide(s(4, 2), p(3, 3), False)
    assert d.outcome is Outcome.SPLIT_BRAIN
    assert d.errmsg == "Split-brain condition!"
    assert d.exit_code == os.EX_CONFIG
    assert (d.syncsrc, d.bitmap) == (SYNCSRC_UNDEF, None)


@pytest.mark.parametrize(
    "sec,pri,syncsrc",
    [
        (s(4, 5), p(2, 3), SYNCSRC_SECONDARY),  # S.local > P.remote, S.remote > P.local
        (s(1, 2), p(2, 3), SYNCSRC_PRIMARY),  # S.local < P.remote, S.remote == P.local
        (s(1, 0), p(2, 3), SYNCSRC_PRIMARY),  # S.local < P.remote, S.remote < P.local
        (s(3, 5), p(2, 3), SYNCSRC_PRIMARY),  # S.local == P.remote, S.remote > P.local
    ],
)
def test_row7_should_never_happen_is_a_full_sync(sec, pri, syncsrc):
    d = decide(sec, pri, False)
    assert d == Decision(Outcome.INCONSISTENT, syncsrc, BitmapReply.ALL_ONES)


A, B, C = 0xA, 0xB, 0xC  # three copies' IDs


def ids(counters: Counters, replicaid: int, peerid: int) -> Counters:
    return Counters(counters.resuid, counters.localcnt, counters.remotecnt, replicaid, peerid)


def test_a_primary_that_replicated_with_another_copy_is_refused():
    """A replicated with B, then with a new copy C (C confirmed writes B never saw, and A's
    bitmap forgot them), then meets B again: same resuid and counters as an in-step pair."""
    d = decide(ids(s(0, 0), B, A), ids(p(0, 0), A, C), virgin=False)
    assert d.outcome == Outcome.REPLICA_MISMATCH and d.refused
    assert (d.syncsrc, d.bitmap, d.exit_code) == (SYNCSRC_UNDEF, None, os.EX_CONFIG)
    assert d.errmsg == REPLICA_MISMATCH_ERRMSG.format(moved="primary", mover=A, peer=C, other="secondary", other_id=B)
    assert "\n" not in d.errmsg and "hastctl create" in d.errmsg and f"{C:016x}" in d.errmsg


def test_a_secondary_that_replicated_with_another_copy_is_refused():
    d = decide(ids(s(0, 0), B, C), ids(p(0, 0), A, B), virgin=False)
    assert d.outcome == Outcome.REPLICA_MISMATCH
    assert d.errmsg.startswith(f"Replica mismatch: the secondary (copy {B:016x}) last replicated with copy {C:016x}")


@pytest.mark.parametrize(
    "sec,pri",
    [
        ((B, A), (A, B)),  # each other's peer
        ((0, 0), (A, C)),  # a copy from before the IDs: nothing to compare
        ((B, 0), (A, 0)),  # neither replicated with anyone yet
        ((B, A), (0, 0)),  # a primary from before the IDs
        ((B, A), (A, 0)),
    ],
)
def test_copies_that_are_each_others_peer_or_unknown_go_by_the_counters(sec, pri):
    assert decide(ids(s(1, 2), *sec), ids(p(2, 1), *pri), virgin=False).outcome == Outcome.IN_SYNC
    assert decide(ids(s(1, 2), *sec), ids(p(3, 1), *pri), virgin=False).outcome == Outcome.SYNC_FROM_PRIMARY


def test_a_fresh_secondary_is_adopted_whatever_the_primary_replicated_with():
    d = decide(ids(s(0, 0, resuid=0), C, 0), ids(p(4, 4), A, B), virgin=False)
    assert (d.outcome, d.bitmap) == (Outcome.ADOPT_RESUID, BitmapReply.ALL_ONES)


@pytest.mark.parametrize(
    "sec,pri,refused",
    [
        (s(0, 0, resuid=0), p(1, 0), True),  # a fresh copy: refused before it adopts anything
        (s(3, 2), p(5, 3), True),  # row 5: the secondary would sync from it
        (s(3, 2), p(2, 3), True),  # row 4: its bitmap would be copied too
        (s(4, 2), p(2, 3), False),  # row 3: the copy it syncs from: the way to finish
        (s(4, 5), p(2, 3), False),  # row 7 from the secondary
    ],
)
def test_an_inconsistent_primary_is_only_ever_a_sync_target(sec, pri, refused):
    d = decide(sec, pri, virgin=False, primary_inconsistent=True)
    assert (d.outcome == Outcome.STALE_SOURCE) == refused
    if refused:
        assert (d.errmsg, d.adopt_resuid, d.bitmap, d.exit_code) == (STALE_SOURCE_ERRMSG, None, None, os.EX_CONFIG)
    else:
        assert d == decide(sec, pri, virgin=False)


def test_an_unfinished_target_of_this_primary_is_synced_in_full_though_unrecorded():
    """C adopted A's resuid and named A its peer, but A's side of that handshake failed before A
    recorded C: C's data is nothing to keep (marked), so a full sync, not a refusal forever."""
    d = decide(ids(s(0, 0), C, A), ids(p(3, 3), A, B), virgin=False, secondary_inconsistent=True)
    assert (d.outcome, d.syncsrc, d.bitmap, d.stale_side) == (Outcome.INCONSISTENT, SYNCSRC_PRIMARY, BitmapReply.ALL_ONES, "secondary")
    # Not marked: a copy that holds data of its own (the old secondary of the main case).
    assert decide(ids(s(0, 0), C, A), ids(p(3, 3), A, B), virgin=False).outcome == Outcome.REPLICA_MISMATCH
    # Marked, but the target of another primary: refused.
    assert decide(ids(s(0, 0), C, B), ids(p(3, 3), A, B), False, secondary_inconsistent=True).outcome == Outcome.REPLICA_MISMATCH
    # Marked and recorded: the counters go on as usual (a reconnection in the middle of a sync).
    assert decide(ids(s(3, 2), C, A), ids(p(5, 3), A, C), False, secondary_inconsistent=True).outcome == Outcome.SYNC_FROM_PRIMARY


def test_decision_refusals_are_told_from_other_errors():
    refusals = [decide(*case).errmsg for case in (
        (s(4, 2), p(3, 3), False),  # split-brain
        (s(1, 2, resuid=5), p(1, 1), False),
        (ids(s(0, 0), B, A), ids(p(0, 0), A, C), False),
        (s(3, 2), p(5, 3), False, True),
    )]  # fmt: skip
    assert all(is_decision_refusal(m) for m in refusals) and len(set(refusals)) == 4
    for other in ("Unable to lock /dev/sdb: already in use.", "Resource not configured.", ""):
        assert not is_decision_refusal(other)


def test_a_resuid_mismatch_is_said_before_a_replica_mismatch():
    assert decide(ids(s(0, 0, resuid=7), B, C), ids(p(0, 0), A, C), False).outcome == Outcome.RESUID_MISMATCH


def test_primary_without_resuid_is_a_protocol_error():
    with pytest.raises(RemoteProtocolError):
        decide(s(0, 0, resuid=0), p(0, 0, resuid=0), True)


@pytest.mark.parametrize("args", [(-1, 0, 0), (1, -1, 0), (1, 0, U64 + 1)])
def test_counters_are_uint64(args):
    with pytest.raises(ValueError):
        Counters(*args)


def test_counters_accept_uint64_extremes():
    assert Counters(U64, 0, U64).remotecnt == U64


def test_localcnt_bumps_once_per_outage():
    localcnt = 4
    peer_remotecnt = 4  # in sync at the last handshake
    for _ in range(5):
        localcnt = localcnt_after_write(localcnt, peer_remotecnt)
    assert localcnt == 5


def test_localcnt_not_bumped_when_already_ahead():
    assert localcnt_after_write(6, 4) == 6


def test_localcnt_overflow_refused():
    with pytest.raises(ValueError):
        localcnt_after_write(U64, U64)


def test_counters_after_sync_copy_the_secondarys_view():
    assert counters_after_sync(p(5, 3), s(3, 4)) == Counters(UID, 4, 3)


def test_outage_then_sync_then_in_sync():
    pri, sec = p(0, 0), s(0, 0)
    assert decide(sec, pri, False).outcome is Outcome.IN_SYNC
    pri = Counters(pri.resuid, localcnt_after_write(pri.localcnt, sec.remotecnt), pri.remotecnt)
    assert decide(sec, pri, False).outcome is Outcome.SYNC_FROM_PRIMARY
    # The secondary is promoted during a second outage and writes too: split-brain.
    bumped = localcnt_after_write(sec.localcnt, pri.remotecnt)
    promoted = Counters(sec.resuid, bumped, sec.remotecnt)
    assert decide(promoted, pri, False).outcome is Outcome.SPLIT_BRAIN
    # Without that, the sync completes and the pair is in sync again.
    pri = counters_after_sync(pri, sec)
    assert decide(sec, pri, False).outcome is Outcome.IN_SYNC


# --- every combination gets exactly one well-defined answer ---------------------------------------

small = st.integers(0, 4)


def matching_rows(sec: Counters, pri: Counters) -> list[Outcome]:
    rows = {
        Outcome.SYNC_FROM_SECONDARY: sec.localcnt > pri.remotecnt and sec.remotecnt == pri.localcnt,
        Outcome.IN_SYNC: sec.localcnt == pri.remotecnt and sec.remotecnt == pri.localcnt,
        Outcome.SYNC_FROM_PRIMARY: sec.localcnt == pri.remotecnt and sec.remotecnt < pri.localcnt,
        Outcome.SPLIT_BRAIN: sec.localcnt > pri.remotecnt and pri.localcnt > sec.remotecnt,
    }
    return [outcome for outcome, hit in rows.items() if hit]


@given(sl=small, sr=small, pl=small, pr=small, virgin=st.booleans())
def test_every_counter_combination_has_one_answer(sl, sr, pl, pr, virgin):
    sec, pri = s(sl, sr), p(pl, pr)
    d = decide(sec, pri, virgin)
    rows = matching_rows(sec, pri)
    assert len(rows) <= 1, "table rows 3-6 must not overlap"
    assert d.outcome is (rows[0] if rows else Outcome.INCONSISTENT)
    if d.refused:
        assert d.outcome is Outcome.SPLIT_BRAIN
        assert (d.syncsrc, d.bitmap, d.exit_code) == (SYNCSRC_UNDEF, None, os.EX_CONFIG)
    else:
        assert d.syncsrc in (SYNCSRC_PRIMARY, SYNCSRC_SECONDARY)
        assert d.bitmap in (BitmapReply.ON_DISK, BitmapReply.ALL_ONES)
        assert d.exit_code is None
    assert d.adopt_resuid is None and not d.reply_virgin


_ids = st.sampled_from([0, A, B, C])


@given(
    sec=st.builds(Counters, st.integers(0, U64), st.integers(0, U64), st.integers(0, U64), _ids, _ids),
    pri=st.builds(Counters, st.integers(1, U64), st.integers(0, U64), st.integers(0, U64), _ids, _ids),
    virgin=st.booleans(),
)
def test_any_input_gets_a_decision(sec, pri, virgin):
    d = decide(sec, pri, virgin)
    assert isinstance(d.outcome, Outcome)
    assert d.refused == (d.outcome in (Outcome.RESUID_MISMATCH, Outcome.SPLIT_BRAIN, Outcome.REPLICA_MISMATCH))
    moved_on = any(x.peerid and y.replicaid and x.peerid != y.replicaid for x, y in ((sec, pri), (pri, sec)))
    assert (d.outcome == Outcome.REPLICA_MISMATCH) == (sec.resuid == pri.resuid and moved_on)


@given(sl=small, sr=small, pl=small, pr=small)
def test_sync_leaves_the_pair_in_sync(sl, sr, pl, pr):
    sec, pri = s(sl, sr), p(pl, pr)
    d = decide(sec, pri, False)
    if not d.refused:
        assert decide(sec, counters_after_sync(pri, sec), False).outcome is Outcome.IN_SYNC


# -- which side's data the sync overwrites (the `inconsistent` mark) -----------------------------


@pytest.mark.parametrize(
    "sec,pri,virgin,stale",
    [
        (s(0, 0, resuid=0), p(3, 1), True, "secondary"),  # row 1, virgin: what the primary wrote alone
        (s(0, 0, resuid=0), p(3, 1), False, "secondary"),  # row 1: full sync to a fresh disk
        (s(4, 2), p(2, 3), False, "primary"),  # row 3
        (s(3, 2), p(2, 3), False, None),  # row 4: only extents whose writes were in flight
        (s(3, 2), p(5, 3), False, "secondary"),  # row 5
        (s(4, 2), p(3, 3), False, None),  # row 6: refused, nothing is copied
        (s(1, 2, resuid=5), p(1, 1), False, None),  # row 2: refused
        (s(4, 5), p(2, 3), False, "primary"),  # row 7, from the secondary
        (s(1, 0), p(2, 3), False, "secondary"),  # row 7, from the primary
    ],
)
def test_stale_side_names_the_sync_target(sec, pri, virgin, stale):
    assert decide(sec, pri, virgin).stale_side == stale


@given(sl=small, sr=small, pl=small, pr=small)
def test_stale_side_is_always_the_side_synced_to(sl, sr, pl, pr):
    d = decide(s(sl, sr), p(pl, pr), False)
    if d.stale_side is not None:
        target = "primary" if d.syncsrc == SYNCSRC_SECONDARY else "secondary"
        assert d.stale_side == target
    else:
        assert d.refused or d.outcome is Outcome.IN_SYNC
