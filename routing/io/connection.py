"""The Redis connection every process uses, built from settings.

A worker must ride out a Redis restart: a step's progress write or a job's final state change
that meets a closed connection is retried with backoff for about a minute before the job fails,
so a restart (with AOF on, nothing is lost) costs a pause, not the job.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from routing.settings import Settings


def connect(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(
        settings.redis_url,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=settings.redis_retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
        socket_connect_timeout=5,
    )
