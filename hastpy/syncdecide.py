"""Who syncs from whom at connect, and how the primary moves its counters (hast.md §7.2).

Each node stores (resuid, localcnt, remotecnt). localcnt counts the node's own periods of writing
without its peer; remotecnt is what it last knew of the peer's localcnt. The secondary compares its
counters with the primary's at the handshake (secondary.c init_remote) and either names the sync
source, or refuses: a different resource (resuid mismatch) or both sides written apart
(split-brain). hastpy adds a refusal: counters describe two copies only while each is the other's
peer, so a copy that replicated with a third one since (replicaid, peerid) is refused too.
The secondary never changes its counters; only the primary moves them, with the two helpers below.
"""

import enum
import os
from dataclasses import dataclass

from hastpy.errors import RemoteProtocolError

# Sync source, as numbered on the wire (hast.h HAST_SYNCSRC_*).
SYNCSRC_UNDEF = 0
SYNCSRC_PRIMARY = 1
SYNCSRC_SECONDARY = 2

# resuid and the counters are uint64 in the metadata and on the wire.
_UINT64_MAX = (1 << 64) - 1

# Texts hastd uses; the primary recognises SPLIT_BRAIN_ERRMSG verbatim and fires its own hook.
SPLIT_BRAIN_ERRMSG = "Split-brain condition!"
SPLIT_BRAIN_LOG = "Split-brain detected, exiting."
RESUID_MISMATCH_ERRMSG = "Resource unique ID mismatch (primary={primary}, secondary={secondary})."
# hastpy: the primary is the unfinished target of a sync and this copy would sync from it. Said
# by whichever side sees it first (the secondary, if the primary sent its mark).
STALE_SOURCE_ERRMSG = (
    "The primary's data is inconsistent (a synchronization to it did not finish) and this copy would "
    "synchronize from it; connect it to the copy it was synchronizing from, or make that copy primary."
)
# hastpy: the two copies' counters are not about each other (Counters.replicaid). Logged on both
# sides (the primary's reason for not connecting, at WARNING); the IDs are 16 hex digits, as
# `hastctl dump` shows them.
REPLICA_MISMATCH_ERRMSG = (
    "Replica mismatch: the {moved} (copy {mover:016x}) last replicated with copy {peer:016x}, not "
    "with this {other} (copy {other_id:016x}), so the two may differ anywhere. Keep the copy you "
    "trust as primary and recreate the other (hastctl create) to synchronize it fully."
)


class Outcome(enum.Enum):
    """Which row of the §7.2 table matched."""

    ADOPT_RESUID = 1  # row 1: the secondary was just created
    RESUID_MISMATCH = 2  # row 2: the providers belong to different resources
    SYNC_FROM_SECONDARY = 3  # row 3: the primary is out of date
    IN_SYNC = 4  # row 4
    SYNC_FROM_PRIMARY = 5  # row 5: the secondary is out of date
    SPLIT_BRAIN = 6  # row 6: both nodes were written while apart
    INCONSISTENT = 7  # row 7: "should never happen"; full sync
    REPLICA_MISMATCH = 8  # hastpy: one of them replicated with a third copy since they were in step
    STALE_SOURCE = 9  # hastpy: the primary's data is marked inconsistent and would be the source


class BitmapReply(enum.Enum):
    """What the secondary sends after its handshake reply."""

    NONE = "none"  # nothing: a virgin pair has nothing to sync
    ALL_ONES = "all-ones"  # every extent: full sync
    ON_DISK = "on-disk"  # the secondary's own on-disk activemap


@dataclass(frozen=True)
class Counters:
    """One node's view: its resource unique ID and its two counters, each a uint64; and (hastpy,
    0 when unknown) its copy's ID and the ID of the copy it last replicated with."""

    resuid: int
    localcnt: int
    remotecnt: int
    replicaid: int = 0
    peerid: int = 0

    def __post_init__(self):
        for name in ("resuid", "localcnt", "remotecnt", "replicaid", "peerid"):
            value = getattr(self, name)
            if not 0 <= value <= _UINT64_MAX:
                raise ValueError(f"{name} {value} is not a uint64")


@dataclass(frozen=True)
class Decision:
    """The secondary's answer to a handshake.

    A refusal (``errmsg`` set) means: reply with ``errmsg``, then exit with ``exit_code``
    (EX_CONFIG); ``syncsrc`` is UNDEF and ``bitmap`` is None. Otherwise reply with ``syncsrc`` (and
    ``virgin`` if ``reply_virgin``), write ``adopt_resuid`` into the metadata first if it is set,
    and send ``bitmap``.
    """

    outcome: Outcome
    syncsrc: int
    bitmap: BitmapReply | None
    errmsg: str | None = None
    exit_code: int | None = None
    adopt_resuid: int | None = None
    reply_virgin: bool = False

    @property
    def refused(self) -> bool:
        return self.errmsg is not None

    @property
    def stale_side(self) -> str | None:
        """"secondary" or "primary": the node whose data this handshake's sync overwrites because
        it is older than its peer's (a fresh secondary, rows 1, 3, 5 and 7); None when neither is
        (row 4: at most extents whose writes were still in flight).

        Row 1 with `virgin` too: the flag only says the primary never connected (hastd sends it
        whenever its resuid is 0), not that it wrote nothing; what it wrote alone is in its own
        bitmap, which the sync copies, and until that pass completes the fresh disk lacks it."""
        if self.refused or self.outcome == Outcome.IN_SYNC:
            return None
        return "primary" if self.syncsrc == SYNCSRC_SECONDARY else "secondary"


def decide(secondary: Counters, primary: Counters, virgin: bool, primary_inconsistent: bool = False,
           secondary_inconsistent: bool = False) -> Decision:  # fmt: skip
    """Apply §7.2's table. ``virgin`` is whether the primary sent the virgin flag;
    ``primary_inconsistent`` (hastpy) whether it said its data is marked inconsistent: it may
    then only be synchronized from this copy, never be the source (refused before this side
    adopts or writes anything); ``secondary_inconsistent`` whether this copy's is.

    RemoteProtocolError if the primary's resuid is 0: it generates one before its first connect.
    """
    d = _decide(secondary, primary, virgin, secondary_inconsistent)
    if primary_inconsistent and not d.refused and d.syncsrc != SYNCSRC_SECONDARY:
        return _refuse(Outcome.STALE_SOURCE, STALE_SOURCE_ERRMSG)
    return d


def _decide(secondary: Counters, primary: Counters, virgin: bool, secondary_inconsistent: bool) -> Decision:
    if primary.resuid == 0:
        raise RemoteProtocolError("primary sent resuid 0")
    if secondary.resuid == 0:
        return _adopt(primary.resuid, virgin)
    if secondary.resuid != primary.resuid:
        text = RESUID_MISMATCH_ERRMSG.format(primary=primary.resuid, secondary=secondary.resuid)
        return _refuse(Outcome.RESUID_MISMATCH, text)
    target_of_this_primary = secondary_inconsistent and primary.replicaid and secondary.peerid == primary.replicaid
    if target_of_this_primary and primary.peerid and primary.peerid != secondary.replicaid:
        # This copy is the unfinished target of a sync from this very primary, which has not
        # recorded it as its peer (the handshake that adopted it failed after this side's
        # metadata was written): its data is nothing to keep, so a full sync is always right.
        return Decision(Outcome.INCONSISTENT, SYNCSRC_PRIMARY, BitmapReply.ALL_ONES)
    for moved, mover, other, node in (("primary", primary, "secondary", secondary), ("secondary", secondary, "primary", primary)):
        if mover.peerid and node.replicaid and mover.peerid != node.replicaid:
            # mover's counters are about that other copy. A 0 proves nothing and passes; but the
            # secondary gives itself an ID before deciding (secondary._handshake), so a copy
            # from before the IDs is not waved through by a primary that has moved on.
            text = REPLICA_MISMATCH_ERRMSG.format(moved=moved, mover=mover.replicaid, peer=mover.peerid,
                                                  other=other, other_id=node.replicaid)  # fmt: skip
            return _refuse(Outcome.REPLICA_MISMATCH, text)
    return _compare_counters(secondary, primary)


# The first words of the refusals above: the secondary's decision, which stays the same until an
# operator acts (the primary retries those at hastd's guard pace, not every second).
DECISION_REFUSALS = (SPLIT_BRAIN_ERRMSG, RESUID_MISMATCH_ERRMSG.split(" (")[0],
                     REPLICA_MISMATCH_ERRMSG.split(" the {")[0], STALE_SOURCE_ERRMSG.split(" (")[0])  # fmt: skip


def is_decision_refusal(errmsg: str) -> bool:
    return errmsg.startswith(DECISION_REFUSALS)


def _adopt(resuid: int, virgin: bool) -> Decision:
    # Without the virgin flag the primary's disk holds data this fresh secondary lacks.
    bitmap = BitmapReply.NONE if virgin else BitmapReply.ALL_ONES
    return Decision(
        Outcome.ADOPT_RESUID, SYNCSRC_PRIMARY, bitmap, adopt_resuid=resuid, reply_virgin=True
    )


def _refuse(outcome: Outcome, errmsg: str) -> Decision:
    return Decision(outcome, SYNCSRC_UNDEF, None, errmsg=errmsg, exit_code=os.EX_CONFIG)


def _compare_counters(s: Counters, p: Counters) -> Decision:
    secondary_wrote_alone = s.localcnt > p.remotecnt
    primary_wrote_alone = p.localcnt > s.remotecnt
    secondary_caught_up = s.localcnt == p.remotecnt
    primary_caught_up = s.remotecnt == p.localcnt
    if secondary_wrote_alone and primary_caught_up:
        return Decision(Outcome.SYNC_FROM_SECONDARY, SYNCSRC_SECONDARY, BitmapReply.ON_DISK)
    if secondary_caught_up and primary_caught_up:
        return Decision(Outcome.IN_SYNC, SYNCSRC_PRIMARY, BitmapReply.ON_DISK)
    if secondary_caught_up and primary_wrote_alone:
        return Decision(Outcome.SYNC_FROM_PRIMARY, SYNCSRC_PRIMARY, BitmapReply.ON_DISK)
    if secondary_wrote_alone and primary_wrote_alone:
        return _refuse(Outcome.SPLIT_BRAIN, SPLIT_BRAIN_ERRMSG)
    # A counter went backwards; nothing can be trusted, so copy everything from the newer side.
    syncsrc = SYNCSRC_SECONDARY if secondary_wrote_alone else SYNCSRC_PRIMARY
    return Decision(Outcome.INCONSISTENT, syncsrc, BitmapReply.ALL_ONES)


def localcnt_after_write(localcnt: int, peer_remotecnt: int) -> int:
    """The primary's localcnt after a write made while disconnected.

    ``peer_remotecnt`` is the secondary's remotecnt learned at the last handshake. The first such
    write of an outage bumps localcnt; after that localcnt no longer equals peer_remotecnt, so
    calling this on every disconnected write bumps at most once per outage. Write the metadata
    (before the data write) whenever the result differs from ``localcnt``.
    """
    if localcnt != peer_remotecnt:
        return localcnt
    if localcnt == _UINT64_MAX:
        raise ValueError("localcnt would overflow uint64")
    return localcnt + 1


def counters_after_sync(primary: Counters, secondary: Counters) -> Counters:
    """The primary's counters once a sync has completed: it now agrees with the secondary's view."""
    return Counters(primary.resuid, localcnt=secondary.remotecnt, remotecnt=secondary.localcnt)
