"""The worker's Celery app and its one GPU task.

Started by ``python -m worker`` (or ``celery -A worker.celery_app worker``). The parent process
never imports torch: models load in the pool child, so nothing forks after CUDA has started.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from typing import Any

import redis
from celery.signals import worker_process_init

from routing.celery_config import RUN_JOB_TASK, make_celery
from routing.classes import VramClass
from routing.eta import HEARTBEAT_TTL_S, heartbeat
from routing.jobs import JobStore
from routing.keys import Keys
from routing.messages import TaskMessages
from routing.settings import get_settings
from routing.storage import make_storage
from worker.pool import PipelinePool
from worker.runner import JobRunner

log = logging.getLogger(__name__)

settings = get_settings()
vram_class = VramClass(settings.worker_class)
app = make_celery(settings, vram_class)
# Loading real weights takes minutes; the parent must not kill a child still warming up.
app.conf.worker_proc_alive_timeout = 900

_runner: JobRunner | None = None


def get_runner() -> JobRunner:
    """The process's runner, built on first use (in the pool child, after the fork)."""
    global _runner
    if _runner is None:
        from worker.adapters import load_adapter
        from worker.adapters.base import Runtime

        client = redis.Redis.from_url(settings.redis_url)
        keys = Keys(settings.key_prefix)
        name = f"{vram_class.value}@{socket.gethostname()}:{os.getpid()}"
        runtime = Runtime.resolve(settings.device, settings.dtype)

        def load(spec: Any, offload: bool) -> Any:
            weights = settings.weights_for(spec.key, spec.hub_id)
            return load_adapter(spec, weights, dataclasses.replace(runtime, offload=offload))

        def count(change: str, model_key: str) -> None:
            counts = keys.load_counts if change == "load" else keys.eviction_counts
            client.hincrby(counts, f"{name}:{model_key}", 1)

        pool = PipelinePool(load, vram_class, budget_gb=settings.vram_budget_gb, on_change=count)
        store = JobStore(
            client,
            keys,
            ttl_s=settings.job_ttl_s,
            messages=TaskMessages(app),
            progress_webhook_interval_s=settings.progress_webhook_interval_s,
        )
        _runner = JobRunner(store, make_storage(settings), pool, name)
        _start_heartbeat(client, keys, name)
    return _runner


def _start_heartbeat(client: redis.Redis, keys: Keys, name: str) -> None:
    """Tell ETAs this worker is alive, from a thread: a long job must not make it look dead."""

    def beat() -> None:
        while True:
            try:
                heartbeat(client, keys, name, vram_class)
            except redis.RedisError:
                log.warning("heartbeat failed; retrying")
            time.sleep(HEARTBEAT_TTL_S / 3)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


@worker_process_init.connect
def _warm(**_: Any) -> None:
    runner = get_runner()
    for model_key in settings.warm_models:
        runner.pool.get(model_key)


@app.task(name=RUN_JOB_TASK)
def run_job(job_id: str) -> str:
    return get_runner().run(job_id)
