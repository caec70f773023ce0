"""Every accepted job ends once, even when the write of its end is refused.

A worker that lives but cannot write a job's end (Redis out of memory or read only, an outage
longer than the connection's retries) has already acknowledged the job's message, and the
reaper only asks whether the worker is alive. So the worker writes the end until it lands, and
the expiry sweep ends a job still running long past the hard time limit, whatever its worker's
state. Redis here is a ``redis-server`` of the test's own, made to refuse writes for real: made
a replica of a master that is not there, it keeps its data and answers every write ``READONLY``,
as a primary demoted by a failover does."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from routing.celery_config import make_celery
from routing.classes import VramClass
from routing.errors import ErrorType
from routing.io.storage import LocalStorage
from routing.jobs import lifecycle
from routing.jobs.expiry import FINISH_GRACE_S, ExpirySweep
from routing.jobs.keys import Keys
from routing.jobs.messages import TaskMessages
from routing.jobs.record import JobStatus
from routing.jobs.store import JobStore, NewJob
from routing.settings import Settings
from tests.faults.harness import RedisServer
from worker.adapters.base import Images
from worker.pool import Checkout
from worker.runner import Ended, JobRunner

REQUEST = '{"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2}'


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    yield redis_server
    redis_server.stop()


@pytest.fixture
def store(server: RedisServer) -> JobStore:
    messages = TaskMessages(make_celery(Settings(redis_url=server.url)))
    return JobStore(server.client(), Keys(f"test-{uuid.uuid4().hex[:8]}"), ttl_s=3600, messages=messages)


def _queued(store: JobStore, tenant: str = "acme") -> str:
    job_id = uuid.uuid4().hex
    queue = f"{store.keys.prefix}:messages"  # not a queue any worker reads
    store.create(
        [NewJob(job_id, "z-image-turbo", "text-to-image", REQUEST, "gpu16", (queue, "m"), tenant=tenant)]
    )
    return job_id


def _refuse_writes(server: RedisServer, refuse: bool) -> None:
    admin = server.client()
    if refuse:
        admin.replicaof("127.0.0.1", "1")  # nothing listens on port 1: it never syncs
    else:
        admin.replicaof("NO", "ONE")
    admin.close()


class _Adapter:
    """Generates one image; Redis stops taking writes as it finishes (after its progress write)."""

    def __init__(self, on_generated):
        self.on_generated = on_generated
        self.speed = None

    def prepare(self, request, inputs, timings, on_progress):
        return inputs

    def run(self, request, inputs, on_step):
        on_step(1, 1)
        self.on_generated()
        return Images(images=[Image.new("RGB", (64, 64))], seed=1)


def test_a_refused_end_is_written_once_redis_takes_writes_again(server, store, tmp_path):
    job_id = _queued(store)
    restored = threading.Event()

    def read_only_for_a_while() -> None:
        _refuse_writes(server, True)

        def restore() -> None:
            time.sleep(1.5)
            _refuse_writes(server, False)
            restored.set()

        threading.Thread(target=restore, daemon=True).start()

    adapter = _Adapter(read_only_for_a_while)
    pool = SimpleNamespace(
        vram_class=VramClass.GPU16, get=lambda model, work=None: Checkout(adapter, loaded=False, load_s=0.0)
    )
    runner = JobRunner(
        store, LocalStorage(tmp_path / "objects"), pool, "gpu16@test:1:0", max_pending_outputs=0
    )  # type: ignore[arg-type]

    outcome = runner.run(job_id)

    assert restored.is_set()  # the end was refused first, then written
    assert outcome == Ended(JobStatus.SUCCEEDED)
    record = store.get(job_id)
    assert record.status is JobStatus.SUCCEEDED and len(record.outputs) == 1
    ends = [e["type"] for e in store.events(job_id) if e["type"] in ("job.succeeded", "job.failed")]
    assert ends == ["job.succeeded"]  # ended once
    assert store.client.scard(store.keys.running) == 0


def test_the_sweep_ends_a_job_running_past_the_time_limit_whatever_its_worker(store):
    max_run_s = 60.0
    overdue, on_time = _queued(store), _queued(store)
    long_ago = time.time() - max_run_s - FINISH_GRACE_S - 5
    # Both claimed by a worker that is alive (its heartbeat key is there): the reaper leaves them.
    store.client.set(store.keys.worker("gpu16@alive:1:0"), "{}", ex=60)
    store.move(overdue, lifecycle.claim(store.get(overdue), "gpu16@alive:1:0", long_ago))
    store.move(on_time, lifecycle.claim(store.get(on_time), "gpu16@alive:1:0", time.time() - max_run_s))
    in_flight = store.keys.tenant_in_flight("acme")
    assert store.client.scard(in_flight) == 2

    ended = ExpirySweep(store, max_wait_s=3600, interval_s=1, max_run_s=max_run_s).sweep()

    assert ended == [overdue]
    record = store.get(overdue)
    assert record.status is JobStatus.FAILED and record.error.type is ErrorType.TIME_LIMIT
    assert "never ended" in record.error.message
    assert store.get(on_time).status is JobStatus.RUNNING  # within its time: left alone
    assert store.client.scard(in_flight) == 1  # the tenant's slot is free again
    # The worker's late write of the end is refused: the job ended once.
    with pytest.raises(Exception, match="cannot become"):
        store.move(
            overdue,
            lifecycle.finish(
                JobStatus.SUCCEEDED, owner="gpu16@alive:1:0", attempt=record.attempt, finished_at=time.time()
            ),
        )
