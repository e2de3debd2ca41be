"""Per-token limit on job submissions: a sliding window, answered with 429 and ``Retry-After``.

One token looping over ``POST /jobs`` would otherwise fill the GPU queue for everyone (each job
is minutes to hours of device time). The window lives in the API process's memory: with several
API processes each enforces its own share, which bounds the total without a shared store.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable


class RateLimited(Exception):
    """Too many submissions in the window; ``retry_after_s`` says when the next one is allowed."""

    def __init__(self, limit: int, window_s: float, retry_after_s: int) -> None:
        super().__init__(
            f"rate limit: at most {limit} job submissions per {window_s:g} s per token; "
            f"retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class SlidingWindowLimiter:
    """At most ``limit`` events per ``window_s`` for each key (``limit`` 0 disables it)."""

    def __init__(self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._events: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def hit(self, key: str) -> None:
        """Record one event for ``key`` or raise :class:`RateLimited` (the event is then not counted)."""
        if self.limit <= 0:
            return
        now = self.clock()
        with self._lock:
            events = self._events[key]
            while events and events[0] <= now - self.window_s:
                events.popleft()
            if len(events) >= self.limit:
                wait = max(1, math.ceil(events[0] + self.window_s - now))
                raise RateLimited(self.limit, self.window_s, wait)
            events.append(now)
