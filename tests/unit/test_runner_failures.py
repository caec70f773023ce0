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

from routing.catalog import get_model
from routing.celery_config import make_celery
from routing.classes import VramClass
from routing.errors import ErrorType
from routing.io.storage import LocalStorage
from routing.jobs.keys import Keys
from routing.jobs.messages import TaskMessages
from routing.jobs.record import JobStatus
from routing.jobs.store import JobStore, NewJob
from routing.memory import predict, work_of
from routing.schemas import parse_request
from routing.settings import Settings
from worker.adapters.base import Generated, Images
from worker.pool import Checkout, PipelinePool
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

    def prepare(self, request, inputs, timings, on_progress):
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
        vram_class=VramClass.GPU16, get=lambda model, work=None: Checkout(adapter, loaded=False, load_s=0.0)
    )
    # max_pending_outputs=0: step 4 runs on the calling thread, so its outcome is run()'s.
    return JobRunner(store, LocalStorage(tmp_path), pool, "gpu16@test:1:0", max_pending_outputs=0)  # type: ignore[arg-type]


def _queued(store: JobStore, request: dict | None = None, vram_class: str = "gpu16") -> str:
    job_id = uuid.uuid4().hex
    queue = f"{store.keys.prefix}:messages"  # not a queue any worker reads
    body = json.dumps(request or REQUEST)
    store.create([NewJob(job_id, "z-image-turbo", "text-to-image", body, vram_class, (queue, "m"))])
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


BIG_REQUEST = REQUEST | {"width": 2048, "height": 2048}


def _pool_runner(store: JobStore, tmp_path: Path, vram_class: VramClass, budget_gb: float) -> JobRunner:
    """A runner over a real pool whose loader must never be called: the job is refused first."""

    def load(spec, placement):
        raise AssertionError(f"{spec.key} loaded for a job that cannot fit")

    pool = PipelinePool(load, vram_class, budget_gb=budget_gb)
    return JobRunner(
        store, LocalStorage(tmp_path), pool, f"{vram_class.value}@test:1:0", max_pending_outputs=0
    )


def _big_peak_gib(vram_class: VramClass) -> float:
    """BIG_REQUEST's predicted peak on one card of ``vram_class``."""
    spec = get_model("z-image-turbo")
    found = predict(spec, vram_class, work_of(parse_request(BIG_REQUEST), spec))
    assert found is not None
    return found.peak_gib


def test_a_job_whose_predicted_peak_cannot_fit_the_pool_escalates_before_it_runs(
    store: JobStore, tmp_path: Path
):
    """Catches a job the pool's arithmetic says cannot fit being run anyway (an out-of-memory
    error on the card), or refused as a failure instead of handed to the bigger class."""
    job_id = _queued(store, BIG_REQUEST)
    store.client.delete("gpu80")
    budget_gb = _big_peak_gib(VramClass.GPU16) - 0.5

    outcome = _pool_runner(store, tmp_path, VramClass.GPU16, budget_gb=budget_gb).run(job_id)

    assert outcome == Requeued("escalated", "gpu80", "out of memory: to gpu80")
    record = store.get(job_id)
    assert (record.status, record.queue, record.error.type, record.error.exception) == (
        JobStatus.QUEUED,
        "gpu80",
        ErrorType.OUT_OF_MEMORY,
        "DoesNotFit",
    )
    assert "z-image-turbo at 2048x2048 needs a predicted" in record.error.message
    assert store.client.llen("gpu80") == 1
    store.client.delete("gpu80")


def test_a_job_that_fits_no_bigger_class_fails_naming_the_limit(store: JobStore, tmp_path: Path):
    """Catches a job with nowhere bigger to go left queued or failed without saying the limit."""
    job_id = _queued(store, BIG_REQUEST, vram_class="h100x8")

    budget_gb = _big_peak_gib(VramClass.H100X8) - 0.5
    outcome = _pool_runner(store, tmp_path, VramClass.H100X8, budget_gb=budget_gb).run(job_id)

    record = store.get(job_id)
    assert outcome == Ended(JobStatus.FAILED, record.error)
    assert record.status is JobStatus.FAILED and record.error.type is ErrorType.OUT_OF_MEMORY
    assert f"{budget_gb:.2f} GiB budget (given)" in record.error.message
