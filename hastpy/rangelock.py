"""Range locks for writes in flight: user writes and sync chunks (rangelock.c, hast.md §7.1).

A sync chunk reads a range from one node and writes it to the other. A user write to the same range
in between would be overwritten with the older data on the target, so the two must not overlap in
time.

Unlike hastd, overlapping user writes exclude each other too. Two overlapping writes in flight at
once may land in one order on the local disk and in the other on the peer (several disk threads
on each side), leaving replicas that differ forever with no dirty bit to show it. Serializing them
costs nothing for filesystems, which never have overlapping writes in flight.

Pure data structure: not thread-safe, never blocks. The caller guards it with a
threading.Condition: ``while (token := locks.try_lock(...)) is None: cond.wait()``, and
``notify_all`` after each ``unlock``.

Hazard: there is no fairness. A steady stream of overlapping user writes can hold off a sync chunk
indefinitely (as in hastd); a sync chunk holds its range only briefly, so writes are not starved.
"""

import enum


class LockKind(enum.Enum):
    REGULAR = "regular"  # a user write
    SYNC = "sync"  # a sync chunk: exclusive

    # Kinds key dicts looked up several times per user write. Members are singletons compared by
    # identity, so identity hashing is exact, and it is C code where Enum's __hash__ is Python.
    __hash__ = object.__hash__


# Which kinds of held lock block a new lock of each kind: every overlap conflicts (module doc).
_BLOCKED_BY = {
    LockKind.REGULAR: (LockKind.REGULAR, LockKind.SYNC),
    LockKind.SYNC: (LockKind.REGULAR, LockKind.SYNC),
}


class RangeToken:
    """A held lock on [offset, offset+length); compared by identity, so each lock is distinct.

    A plain class with slots rather than a frozen dataclass: one is made per user write, and a
    frozen dataclass's __init__ costs several times more. Treat the fields as read-only.
    """

    __slots__ = ("kind", "offset", "length")

    def __init__(self, kind: LockKind, offset: int, length: int):
        self.kind = kind
        self.offset = offset
        self.length = length

    def __repr__(self) -> str:
        return f"RangeToken({self.kind.name}, {self.offset}, {self.length})"


class RangeLocks:
    """The set of held range locks of one resource."""

    def __init__(self):
        self._held: dict[LockKind, set[RangeToken]] = {kind: set() for kind in LockKind}

    def __len__(self) -> int:
        return sum(len(tokens) for tokens in self._held.values())

    def is_locked(self, offset: int, length: int, kind: LockKind) -> bool:
        """Whether a held lock of ``kind`` overlaps [offset, offset+length); an empty range never
        does."""
        _check_range(offset, length)
        if length == 0:
            return False
        end = offset + length
        for token in self._held[kind]:  # ranges share a byte; an empty one shares none
            if token.length and token.offset < end and offset < token.offset + token.length:
                return True
        return False

    def try_lock(self, kind: LockKind, offset: int, length: int) -> RangeToken | None:
        """Take a lock on the range, or return None if a conflicting lock overlaps it."""
        _check_range(offset, length)
        for blocker in _BLOCKED_BY[kind]:
            if self.is_locked(offset, length, blocker):
                return None
        token = RangeToken(kind, offset, length)
        self._held[kind].add(token)
        return token

    def unlock(self, token: RangeToken) -> None:
        """Release a lock; ValueError if it is not held (a double unlock is a caller bug)."""
        held = self._held[token.kind]
        if token not in held:
            raise ValueError(f"{token} is not held")
        held.remove(token)


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"invalid range {offset}+{length}")
