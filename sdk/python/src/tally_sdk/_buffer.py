"""The bounded in-memory buffer of events waiting to be sent, and what happens when it is full."""

import enum
import threading
from collections import deque
from typing import Any, Deque, Dict, List

from .exceptions import BufferFullError

Event = Dict[str, Any]


class WhenFull(str, enum.Enum):
    """What ``track_*`` does with an event when ``max_buffer`` events are already waiting.

    ``RAISE`` (the default) raises :class:`~tally_sdk.BufferFullError` carrying the event: nothing
    is lost without the caller knowing. ``DROP_OLDEST`` drops the oldest waiting event to make
    room, logs a warning and counts it in ``dropped_events``: for callers that must never fail
    because metering is down and accept losing the oldest usage.
    """

    RAISE = "raise"
    DROP_OLDEST = "drop_oldest"


class EventBuffer:
    """Events not yet taken by Tally: the waiting ones plus those of the batch in flight, at most
    ``max_events`` together. Thread-safe (the sync client flushes from a background thread)."""

    def __init__(self, max_events: int, when_full: WhenFull) -> None:
        self.max_events = max_events
        self.when_full = WhenFull(when_full)
        self.dropped_events = 0
        self._waiting: Deque[Event] = deque()
        self._in_flight = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting) + self._in_flight

    def waiting(self) -> int:
        """Events not yet handed to a flush."""
        with self._lock:
            return len(self._waiting)

    def snapshot(self) -> List[Event]:
        """Copies of the waiting events (for inspection; they stay in the buffer)."""
        with self._lock:
            return [dict(event) for event in self._waiting]

    def add(self, event: Event) -> bool:
        """Adds an event. Returns False when the oldest waiting event was dropped for it."""
        with self._lock:
            if len(self._waiting) + self._in_flight < self.max_events:
                self._waiting.append(event)
                return True
            if self.when_full is WhenFull.DROP_OLDEST and self._waiting:
                self._waiting.popleft()
                self.dropped_events += 1
                self._waiting.append(event)
                return False
        raise BufferFullError(
            f"{self.max_events} events are waiting to be sent to Tally (max_buffer); the event was not buffered",
            event=event,
        )

    def take(self, count: int) -> List[Event]:
        """Up to ``count`` of the oldest events, now in flight until ``done`` or ``put_back``."""
        with self._lock:
            batch = [self._waiting.popleft() for _ in range(min(count, len(self._waiting)))]
            self._in_flight += len(batch)
            return batch

    def done(self, batch: List[Event]) -> None:
        """Tally answered for these events (stored, duplicate or rejected)."""
        with self._lock:
            self._in_flight -= len(batch)

    def put_back(self, batch: List[Event]) -> None:
        """Sending failed for a while: the events wait again, first in line, unchanged (same
        ``event_id`` and ``timestamp``), so the next flush resends them and Tally stores them once."""
        with self._lock:
            self._in_flight -= len(batch)
            self._waiting.extendleft(reversed(batch))
