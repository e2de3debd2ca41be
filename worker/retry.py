"""Bounded retries with exponential backoff around the worker's database writes.

A job runs for hours; the database it reports to may restart, fail over or drop connections in
that time. A write that fails because the connection did (``OperationalError``/``InterfaceError``,
or a connection SQLAlchemy marked invalidated) is retried on a fresh connection, waiting 0.5 s,
1 s, 2 s ... up to ``max_delay_s``, for at most ``attempts`` tries: long enough to ride out a
restart, bounded so that a database that stays down fails the attempt loudly (the job is then
re-run from its checkpoint by the next worker) instead of hanging or dropping data. Every retried
block is one transaction, but "rolled back" is not guaranteed: a connection lost while COMMIT is
acknowledged leaves a transaction that landed and an error that says it failed. So every retried block
must also be idempotent (the progress write replaces a job's metric points by their (kind, step)).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    base_delay_s: float = 0.5
    max_delay_s: float = 10.0

    def delays(self) -> list[float]:
        return [min(self.base_delay_s * 2**i, self.max_delay_s) for i in range(self.attempts - 1)]


DEFAULT_POLICY = RetryPolicy()


def is_transient(exc: BaseException) -> bool:
    """A lost or refused connection (worth retrying), not a bad statement (never retried)."""
    if isinstance(exc, OperationalError | InterfaceError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def with_retry(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, retried after transient database errors; the last error is raised unchanged."""
    delays = policy.delays()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == len(delays):
                raise
            log.warning(
                "database write (%s) failed, retry %d/%d in %.1f s: %s",
                what,
                attempt + 1,
                len(delays),
                delays[attempt],
                str(exc).splitlines()[0],
            )
            sleep(delays[attempt])
    raise AssertionError("unreachable")  # pragma: no cover
