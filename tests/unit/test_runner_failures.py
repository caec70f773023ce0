"""What an exception makes of a job, by where it was raised, on the suite's Redis: running out of
memory while generating sends the job to a bigger class; a host ``MemoryError`` while encoding
its outputs is an ordinary failure (a bigger GPU adds no host memory)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis as redis_lib
from PIL import Image

from routing.celery_config import make_celery
from routing.classes import VramClass
from routing.errors import ErrorType
from routing.io.storage import LocalStorage
from routing.jobs.keys import Keys
from routing.jobs.messages import TaskMessages
from routing.jobs.record import JobStatus
from routing.jobs.store import JobStore, NewJob
from routing.settings import Settings
from worker.adapters.base import Generated, Images
from worker.pool import Checkout
from worker.runner import Ended, Finishing, JobRunner, Phase, Requeued, failure

REQUEST = {"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2}


class _HostMemoryImage(Image.Image):
    """An image whose encoding runs out of host memory."""

    def save(self, *args, **kwargs) -> None:
        raise MemoryError("cannot allocate the encoder's buffer")


def _image_that_cannot_be_encoded() -> Image.Image:
    image = Image.new("RGB", (64, 64))
    image.__class__ = _HostMemoryImage
    return image


class _Adapter:
    speed = None  # no speed profile: nothing applied around the job

    def __init__(self, run):
        self._run = run

    def prepare(self, request, inputs, timings):
        return inputs

    def run(self, request, inputs, on_step):
        on_step(1, 2)
        return self._run()


@pytest.fixture
def store(redis_client: redis_lib.Redis) -> Iterator[JobStore]:
    messages = TaskMessages(make_celery(Settings(redis_url="redis://127.0.0.1:1/0")))
    yield JobStore(redis_client, Keys(f"test-{uuid.uuid4().hex[:8]}"), ttl_s=3600, messages=messages)


def _runner(store: JobStore, tmp_path: Path, run) -> JobRunner:
    adapter = _Adapter(run)
    pool = SimpleNamespace(
        vram_class=VramClass.GPU16, get=lambda model: Checkout(adapter, loaded=False, load_s=0.0)
    )
    # max_pending_outputs=0: step 4 runs on the calling thread, so its outcome is run()'s.
    return JobRunner(store, LocalStorage(tmp_path), pool, "gpu16@test:1:0", max_pending_outputs=0)  # type: ignore[arg-type]


def _queued(store: JobStore) -> str:
    job_id = uuid.uuid4().hex
    queue = f"{store.keys.prefix}:messages"  # not a queue any worker reads
    store.create(
        [NewJob(job_id, "z-image-turbo", "text-to-image", json.dumps(REQUEST), "gpu16", (queue, "m"))]
    )
    return job_id


def test_a_host_memory_error_while_encoding_fails_the_job_on_its_class(store: JobStore, tmp_path: Path):
    job_id = _queued(store)
    runner = _runner(store, tmp_path, lambda: Images(images=[_image_that_cannot_be_encoded()], seed=1))

    outcome = runner.run(job_id)

    record = store.get(job_id)
    assert outcome == Ended(JobStatus.FAILED, record.error)
    assert record.status is JobStatus.FAILED and record.queue == "gpu16" and record.escalations == []
    assert (record.error.type, record.error.exception) == (ErrorType.MODEL_ERROR, "MemoryError")
    assert store.client.llen("gpu80") == 0  # nothing queued for a bigger class


def test_out_of_memory_while_generating_still_escalates(store: JobStore, tmp_path: Path):
    job_id = _queued(store)
    store.client.delete("gpu80")

    def run() -> Generated:
        raise MemoryError("CUDA out of memory")

    outcome = _runner(store, tmp_path, run).run(job_id)

    assert outcome == Requeued("escalated", "gpu80", "out of memory: to gpu80")
    record = store.get(job_id)
    assert (record.status, record.queue, record.error.type) == (
        JobStatus.QUEUED,
        "gpu80",
        ErrorType.OUT_OF_MEMORY,
    )
    assert [e["to"] for e in record.escalations] == ["gpu80"]
    assert store.client.llen("gpu80") == 1
    store.client.delete("gpu80")


def test_a_job_that_generates_and_encodes_succeeds(store: JobStore, tmp_path: Path):
    job_id = _queued(store)
    outcome = _runner(store, tmp_path, lambda: Images(images=[Image.new("RGB", (64, 64))], seed=1)).run(
        job_id
    )
    assert outcome == Ended(JobStatus.SUCCEEDED)
    assert outcome != Finishing() and store.get(job_id).outputs[0].width == 64


@pytest.mark.parametrize(
    ("exc", "phase", "kind", "escalates"),
    [
        (MemoryError("oom"), Phase.GENERATE, ErrorType.OUT_OF_MEMORY, True),
        (MemoryError("oom"), Phase.STORE, ErrorType.MODEL_ERROR, False),
        (RuntimeError("broke"), Phase.GENERATE, ErrorType.MODEL_ERROR, False),
        (RuntimeError("broke"), Phase.STORE, ErrorType.MODEL_ERROR, False),
    ],
)
def test_the_one_mapping_from_exception_to_outcome(exc, phase, kind, escalates):
    found = failure(exc, phase)
    assert (found.error.type, found.escalate) == (kind, escalates)
    assert found.error.exception == type(exc).__name__
