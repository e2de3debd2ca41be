"""Live job events over Redis pub/sub: the worker publishes, the API's SSE stream subscribes.

Publishing is best effort: the database row stays the truth, and subscribers fall back to polling
it, so a missing Redis (embedded mode) or a lost message only delays what a viewer sees.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)


def channel(job_id: str) -> str:
    """The pub/sub channel of one job."""
    return f"dfq:job:{job_id}:events"


class Publisher:
    """Publishes JSON events for jobs when a Redis URL is configured, otherwise does nothing."""

    def __init__(self, redis_url: str | None) -> None:
        self._client = None
        if redis_url:
            import redis

            self._client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def publish(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        if self._client is None:
            return
        try:
            self._client.publish(channel(job_id), json.dumps({"kind": kind, **data}, default=str))
        except Exception as exc:  # the DB row is the truth; a viewer falls back to polling
            log.warning("could not publish %s event of job %s: %s", kind, job_id, exc)
