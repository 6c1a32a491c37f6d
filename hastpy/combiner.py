"""Combining: what several threads submit at once is handled in groups, by one of them at a time.

The primary's NBD receive threads (one per connection) use it for small writes: the thread that
is already starting writes takes everything the others queued meanwhile as one group (one bitmap
write, one send to the secondary), while the others go back to receiving.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Combiner(Generic[T]):
    """submit(items) from any thread. The first thread in becomes the leader: it calls
    handle(group) with everything queued so far, then again with what was queued meanwhile,
    until the queue is empty; the other threads only queue their items and return at once.

    After max_rounds groups the leader calls hand_off(continue_leading) (a pool's submit, say) and
    returns: a thread with work of its own (a connection to receive from) is not kept leading
    forever under steady load from the others. Whoever runs continue_leading is the leader then.

    handle should not raise; if it does, fail(group, exc) is called for that group and leading
    goes on, so no item is ever left in the queue without a leader. If hand_off raises (its pool
    shut down), everything queued is failed the same way and the lead is given up.

    Items are handled in the order they were queued; each exactly once; at most one handle call
    runs at a time.
    """

    def __init__(
        self,
        handle: Callable[[list[T]], None],
        fail: Callable[[list[T], BaseException], None],
        hand_off: Callable[[Callable[[], None]], object],
        max_rounds: int,
    ) -> None:
        if max_rounds < 1:
            raise ValueError("max_rounds must be at least 1")
        self._handle = handle
        self._fail = fail
        self._hand_off = hand_off
        self._max_rounds = max_rounds
        self._lock = threading.Lock()  # guards _queue and _leading; never held while handling
        self._queue: list[T] = []
        self._leading = False

    def submit(self, items: list[T]) -> None:
        with self._lock:
            self._queue += items
            if self._leading:
                return
            self._leading = True
        self._lead()

    def _lead(self) -> None:
        for _ in range(self._max_rounds):
            with self._lock:
                group, self._queue = self._queue, []
                if not group:
                    self._leading = False
                    return
            try:
                self._handle(group)
            except Exception as exc:  # noqa: BLE001 - the caller's fail() reports it
                self._fail(group, exc)
        try:
            self._hand_off(self._lead)
        except Exception as exc:  # noqa: BLE001 - no one could lead: fail what waits
            with self._lock:
                group, self._queue = self._queue, []
                self._leading = False
            if group:
                self._fail(group, exc)
