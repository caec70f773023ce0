"""Which workers are alive, and what happens to the jobs of those that are not.

Every worker process writes a heartbeat key that expires after ``heartbeat_ttl_s``. A job whose
worker has no heartbeat (or, on this host, whose process no longer exists) was lost with it: the
reaper, which runs in every worker, hands it back to its queue in one atomic step that checks the
dead worker still owns it, so two reapers cannot both requeue it. The broker's own copy of the
message (Kombu restores unacknowledged messages after the visibility timeout) then finds the job
taken or finished and is dropped, so no job runs twice at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from routing.classes import VramClass
from routing.errors import Conflict, NotFound
from routing.eta import heartbeat
from routing.jobs import JobStatus, JobStore

log = logging.getLogger(__name__)

_HOST = socket.gethostname()


def process_name(vram_class: VramClass, pid: int | None = None) -> str:
    """``<class>@<host>:<pid>``: names the process that holds the models and runs jobs."""
    return f"{vram_class.value}@{_HOST}:{pid or os.getpid()}"


def alive(store: JobStore, name: str) -> bool:
    if not store.client.exists(store.keys.worker(name)):
        return False
    host, _, pid = name.partition("@")[2].rpartition(":")
    if host == _HOST and pid.isdigit():
        # On this host the process table is the truth: a killed process's heartbeat key lives on
        # until it expires, but its job need not wait that long.
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def hand_back(store: JobStore, job_id: str, owner: str, reason: str) -> bool:
    """Put a running job back in its queue if ``owner`` still holds it; True if it did."""
    try:
        queue = store.get(job_id).queue
        store.transition(
            job_id,
            JobStatus.QUEUED,
            only_from=JobStatus.RUNNING,
            expect_worker=owner,
            requeue=store.messages.run_job(job_id, queue),
            handed_back=reason,
        )
    except (Conflict, NotFound):
        return False
    log.warning("job %s handed back to its queue: %s", job_id, reason)
    return True


def reap(store: JobStore) -> list[str]:
    """Hand back every running job whose worker is dead; returns their ids."""
    reaped = []
    for job_id in store.running():
        owner = store.client.hget(store.keys.job(job_id), "worker")
        owner = owner.decode() if owner else ""
        if owner and not alive(store, owner) and hand_back(store, job_id, owner, f"worker {owner} died"):
            reaped.append(job_id)
    return reaped


def start(
    store: JobStore, name: str, vram_class: VramClass, ttl_s: float, state: Callable[[], dict] | None = None
) -> threading.Thread:
    """Beat and reap from a thread: a long job must not make its worker look dead. ``state``
    gives what the heartbeat reports besides (resident models, GPU memory)."""

    def loop() -> None:
        while True:
            try:
                heartbeat(store.client, store.keys, name, vram_class, ttl_s, **(state() if state else {}))
                reap(store)
            except redis.RedisError:
                log.warning("heartbeat failed; retrying")
            time.sleep(ttl_s / 3)

    thread = threading.Thread(target=loop, name="heartbeat", daemon=True)
    thread.start()
    return thread
