"""Which workers are alive, and what happens to the jobs of those that are not.

Every worker process writes a heartbeat key that expires after ``heartbeat_ttl_s``. A job whose
worker has no heartbeat (or, on this host, whose process no longer exists) was lost with it: the
reaper, which runs in every worker, hands it back to its queue in one atomic step that checks the
dead worker still owns it, so two reapers cannot both requeue it. The broker's own copy of the
message (given back by the reaper too, ``worker.held``, or restored by Kombu after the visibility
timeout) then finds the job taken or finished and is dropped, so no job runs twice at once. A job
whose message a dead worker took but never claimed is still ``queued``: the reaper gives that
message back to its queue at once (``worker.held``), and the same loop puts back a message lost
as it was taken, before Kombu held it (``worker.lost``).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

import redis

from routing.classes import VramClass
from routing.errors import Conflict, NotFound
from routing.jobs import lifecycle
from routing.jobs.expiry import ExpirySweep
from routing.jobs.record import JobStatus
from routing.jobs.store import JobStore
from routing.jobs.workers import heartbeat
from worker import held
from worker.lost import LostSweep

log = logging.getLogger(__name__)

_HOST = socket.gethostname()
# Drawn once per worker start (in the main process, inherited by its pool children): a worker
# restarted in place (same host name, and in a container the same pid) is a new name, so it
# inherits neither the old one's drain mark nor the jobs the old one held.
_START = secrets.token_hex(4)


def process_name(vram_class: VramClass, pid: int | None = None) -> str:
    """``<class>@<host>:<pid>:<start>``: names the process that holds the models and runs jobs."""
    return f"{vram_class.value}@{_HOST}:{pid or os.getpid()}:{_START}"


def of_this_start(name: str) -> bool:
    """``name`` is a process of this worker start (the main process or its pool children)."""
    return name.endswith(f":{_START}")


def pid_of(name: str) -> int | None:
    """The pid in a process name (see ``process_name``)."""
    pid = name.partition("@")[2].partition(":")[2].split(":", 1)[0]
    return int(pid) if pid.isdigit() else None


def _local_pid(name: str) -> int | None:
    host = name.partition("@")[2].partition(":")[0]
    return pid_of(name) if host == _HOST else None


def _running(pid: int) -> bool:
    """The process exists and has not exited. A zombie (exited, not yet reaped by its parent:
    a pool child killed while its worker's main process is itself shutting down) has exited."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # "pid (comm) S ...": the state follows the last ")" (comm may hold one).
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc here: signal 0 is all there is to go on


def gone(name: str) -> bool:
    """True when ``name`` was a process of this host that no longer exists: dead for certain,
    without waiting for its heartbeat to expire."""
    pid = _local_pid(name)
    return pid is not None and not _running(pid)


def alive(store: JobStore, name: str, heartbeat_key: str | None = None) -> bool:
    """``heartbeat_key``: the key ``name`` beats (a pool child's ``Keys.worker`` by default; a
    main process beats ``Keys.holder``)."""
    if gone(name):
        return False
    if _local_pid(name) is not None and name.endswith(f":{_START}"):
        # A process of this very start, running: alive, even if Redis lost its heartbeat key
        # while it was down. (A pid of another start may be reused by a new process.)
        return True
    return bool(store.client.exists(heartbeat_key or store.keys.worker(name)))


def hand_back(
    store: JobStore, job_id: str, owner: str, reason: str, attempt: int | None = None
) -> JobStatus | None:
    """Put a running job back in its queue if ``owner`` still holds it (at ``attempt``, when
    given). Returns QUEUED if it did, CANCELED if its cancel had been asked for (it ends
    canceled instead), None if the job was not ``owner``'s to give back."""
    try:
        queue = store.get(job_id).queue
        moved = store.move(job_id, lifecycle.hand_back(queue, reason, owner=owner, attempt=attempt))
    except (Conflict, NotFound):
        return None
    if moved.target is JobStatus.CANCELED:
        log.warning("job %s canceled instead of handed back (%s): its cancel was asked for", job_id, reason)
    else:
        log.warning("job %s handed back to its queue: %s", job_id, reason)
    return moved.target


class Reaper:
    """Hands back running jobs whose worker is dead, and gives back the broker messages a dead
    worker's main process held (``worker.held``: a job whose message it took but never claimed);
    a process counts as dead only once it has looked dead for a whole heartbeat TTL, so a Redis
    outage (every heartbeat key expires at once) does not hand back the jobs of workers that are
    only waiting for Redis."""

    def __init__(self, store: JobStore, ttl_s: float):
        self.store = store
        self.ttl_s = ttl_s
        self._dead_since: dict[str, float] = {}

    def forget(self) -> None:
        """Start judging afresh (after an outage: nobody could beat through it)."""
        self._dead_since.clear()

    def reap(self) -> list[str]:
        now = time.monotonic()
        reaped, looked_dead = [], set()
        for job_id in self.store.running():
            owner = self.store.client.hget(self.store.keys.job(job_id), "worker")
            owner = owner.decode() if owner else ""
            if not owner or alive(self.store, owner):
                continue
            looked_dead.add(owner)
            since = self._dead_since.setdefault(owner, now)
            # On this host the process table says so: no need to wait.
            if (gone(owner) or now - since >= self.ttl_s) and hand_back(
                self.store, job_id, owner, f"worker {owner} died"
            ):
                reaped.append(job_id)
        for holder in held.holders(self.store.client, self.store.keys):
            if alive(self.store, holder, self.store.keys.holder(holder)):
                continue
            looked_dead.add(holder)
            since = self._dead_since.setdefault(holder, now)
            if gone(holder) or now - since >= self.ttl_s:
                held.give_back(self.store.client, self.store.keys, holder)
        self._dead_since = {o: t for o, t in self._dead_since.items() if o in looked_dead}
        return reaped


def start(
    store: JobStore,
    name: str,
    vram_class: VramClass,
    ttl_s: float,
    state: Callable[[], dict] | None = None,
    sweep: Callable[[], None] | None = None,
    expiry: ExpirySweep | None = None,
    lost: LostSweep | None = None,
) -> threading.Thread:
    """Beat and reap from a thread: a long job must not make its worker look dead. ``state``
    gives what the heartbeat reports besides (resident models, GPU memory); ``sweep`` is called
    each round (the local store's retention: ``routing.io.retention.RetentionSweep``);
    ``expiry`` also expires jobs queued too long, on any class (``routing.jobs.expiry``);
    ``lost`` puts back the messages taken off a queue and lost before Kombu held them
    (``worker.lost``)."""

    reaper = Reaper(store, ttl_s)

    def loop() -> None:
        while True:
            try:
                started = time.monotonic()
                heartbeat(store.client, store.keys, name, vram_class, ttl_s, **(state() if state else {}))
                # A heartbeat that took this long waited out a Redis outage: every other worker's
                # heartbeat expired meanwhile; give them a TTL to beat again before judging.
                if time.monotonic() - started < ttl_s / 2:
                    reaper.reap()
                else:
                    reaper.forget()
                if expiry is not None:
                    expiry.maybe_sweep()
                if lost is not None:
                    lost.maybe_sweep()
            except redis.RedisError:
                log.warning("heartbeat failed; retrying")
            if sweep is not None:
                sweep()
            time.sleep(ttl_s / 3)

    thread = threading.Thread(target=loop, name="heartbeat", daemon=True)
    thread.start()
    return thread
