"""Runs one job: claim it, generate, store the outputs, record the outcome.

A model failure is a job result (``failed`` with a reason the caller can act on), never a worker
crash; only a broken worker (the process dies) is fatal, and then the broker hands the job back.

The GPU does not wait on the CPU: step 4 (encode, store, record) runs on the finisher's thread
(``worker.finisher``) while the caller takes the next job and generates it, and the next job's
input media are decoded while this one generates (``worker.ahead``). A job is finished only
when its record says so, which step 4 writes after the outputs are stored.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import partial

import redis
from celery.exceptions import SoftTimeLimitExceeded

from routing import tracing
from routing.catalog import get_model
from routing.classes import parse_queue, queue_name
from routing.decision import escalate
from routing.errors import Conflict, ErrorType, InvalidRequest, JobError, NotFound
from routing.io.storage import Storage, StorageError
from routing.jobs import lifecycle
from routing.jobs.codecs import encode_label
from routing.jobs.eta import record_duration
from routing.jobs.expiry import FINISH_GRACE_S
from routing.jobs.record import JobRecord, JobStatus, Output
from routing.jobs.store import JobStore, Step
from routing.limits import DEFAULT_LIMITS, RequestLimits
from routing.memory import work_of
from routing.schemas import RequestBase, parse_request
from worker import outputs as output_files
from worker.adapters.base import Generated, Inputs, JobCanceled
from worker.ahead import DecodeAhead
from worker.busy import BusyMeter
from worker.finisher import Finisher
from worker.liveness import alive, hand_back
from worker.pool import PipelinePool
from worker.speed import job_context
from worker.stages import Throttle

log = logging.getLogger(__name__)

# Told what became of a job once its record says so: (job id, SUCCEEDED | FAILED | CANCELED,
# the error) for a final state, (job id, QUEUED, the reason) for a job handed back to a queue.
OutcomeHook = Callable[[str, JobStatus, dict[str, str] | None], None]


# What became of a job, as ``JobRunner.run`` returns it. Each prints as the worker's log has
# always said it (operators and the suite read those words).


@dataclass(frozen=True)
class Ended:
    """The record says the job ended ``status`` (with ``error`` when it failed)."""

    status: JobStatus
    error: JobError | None = None

    def __str__(self) -> str:
        if self.error is not None and self.error.type is ErrorType.TOO_MANY_ATTEMPTS:
            return "dead-lettered"
        if self.error is not None and self.error.type is ErrorType.EXPIRED:
            return "expired"
        return self.status.value


@dataclass(frozen=True)
class Requeued:
    """The job went back to ``queue``: ``why`` is ``handed_back`` (this worker stopped) or
    ``escalated`` (out of memory: a bigger class's queue)."""

    why: str
    queue: str
    message: str

    def __str__(self) -> str:
        return f"escalated to {self.queue}" if self.why == "escalated" else "handed back"


@dataclass(frozen=True)
class Finishing:
    """Generated; step 4 (encode, store, record) is under way on the finisher's thread."""

    def __str__(self) -> str:
        return "finishing"


@dataclass(frozen=True)
class Skipped:
    """Nothing of the job was this run's to change: it has no record (``status`` None), is in
    ``status`` already, or runs on ``holder``, alive."""

    status: JobStatus | None
    holder: str | None = None

    def __str__(self) -> str:
        if self.status is None:
            return "missing"
        return f"skipped (running on {self.holder})" if self.holder else f"skipped ({self.status.value})"


Outcome = Ended | Requeued | Finishing | Skipped


class Phase(StrEnum):
    GENERATE = "generate"  # steps 2 and 3: the request checked, inputs loaded, the pipeline run
    STORE = "store"  # step 4: the outputs encoded and stored (host CPU and memory only)


@dataclass(frozen=True)
class Failure:
    error: JobError
    escalate: bool  # out of GPU memory: the job goes to a bigger class instead of failing


def failure(exc: BaseException, phase: Phase) -> Failure:
    """What an exception raised in ``phase`` makes of the job. Only running out of memory while
    generating escalates: encoding and storing use the host's memory, which a bigger GPU class
    does not add to, so a ``MemoryError`` there is an ordinary failure."""
    if isinstance(exc, SoftTimeLimitExceeded):
        kind = ErrorType.TIME_LIMIT
    elif isinstance(exc, InvalidRequest):
        kind = ErrorType.INVALID_REQUEST
    elif phase is Phase.GENERATE and _out_of_memory(exc):
        return Failure(_error(ErrorType.OUT_OF_MEMORY, exc), escalate=True)
    else:
        kind = getattr(exc, "error_type", ErrorType.MODEL_ERROR)
    return Failure(_error(kind, exc), escalate=False)


class HandBack(Exception):
    """Raised from the step callback: the worker is shutting down; give the job back."""


class Superseded(Exception):
    """Raised from the step callback: the job is no longer this worker's (the reaper thought it
    dead and handed the job on); stop without touching the record."""


# A refused write of a job's end is tried again after this, doubling up to the cap.
FINISH_RETRY_S = 0.5
FINISH_RETRY_CAP_S = 10.0


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        storage: Storage,
        pool: PipelinePool,
        worker_name: str,
        *,
        max_attempts: int = 3,
        max_wait_s: float = 6 * 3600,
        drain_key: str = "",
        max_pending_outputs: int = 1,
        peek_next: Callable[[], str | None] | None = None,
        on_outcome: OutcomeHook | None = None,
        max_dead_letters: int = 10_000,
        limits: RequestLimits = DEFAULT_LIMITS,
        max_run_s: float = 2 * 3600,
        stage_interval_s: float = 0.5,
    ):
        """``limits``: what a job stored without the limits it was accepted under (stored before
        jobs kept them) is checked under: the worker's own settings'. ``max_run_s``: the hard
        time limit; a job's end is written until then (plus the finish grace), after which the
        expiry sweep ends it. ``stage_interval_s``: least seconds between two progress events of
        one stage of the work before the pipeline (``worker.stages``)."""
        self.store = store
        self.storage = storage
        self.pool = pool
        self.worker_name = worker_name
        self.max_attempts = max_attempts
        self.max_wait_s = max_wait_s
        self.drain_key = drain_key
        self.finisher = Finisher(max_pending_outputs)
        self.ahead = DecodeAhead(peek_next, self._decode_ahead) if peek_next is not None else None
        self.busy = BusyMeter()
        self.on_outcome = on_outcome
        self.max_dead_letters = max_dead_letters
        self.limits = limits
        self.max_run_s = max_run_s
        self.stage_interval_s = stage_interval_s

    def run(self, job_id: str) -> Outcome:
        """Run ``job_id`` to a terminal state, or hand it on; returns what became of it
        (``Finishing`` once step 4 is under way on the finisher's thread, which reports it)."""
        return self._report(job_id, self._run(job_id))

    def _run(self, job_id: str) -> Outcome:
        # 1. Claim it, unless it is finished, canceled, or alive on another worker.
        claimed = self._claim(job_id)
        if not isinstance(claimed, tuple):
            return claimed
        record, started_at = claimed
        self.busy.job_started(started_at, record.created_at)
        finishing = False
        # This attempt's span, under the submit's (routing.tracing); the phases are its children.
        attempt = dict(job_id=job_id, model=record.model, attempt=record.attempt, worker=self.worker_name)
        try:
            with tracing.span("job", record.traceparent, **attempt):
                try:
                    generated = self._generate(job_id, record, started_at)
                finally:
                    self.busy.gpu_done()  # what is left (encode, store, record) is the CPU's
                if not isinstance(generated, tuple):
                    return generated
                parent = tracing.traceparent()
            # 4. Encode and store, then record: on the finisher's thread, while this one takes
            #    the next job (it waits here while max_pending_outputs jobs are finishing).
            try:
                outcome = self.finisher.submit(
                    partial(self._complete, job_id, record, started_at, *generated, parent=parent)
                )
            except SoftTimeLimitExceeded as exc:
                return self._fail(record, exc, Phase.STORE, generated[2], started_at)
            finishing = True
            return outcome or Finishing()
        finally:
            if not finishing:
                self._done_with_job()

    def _generate(
        self, job_id: str, record: JobRecord, started_at: float
    ) -> tuple[RequestBase, Generated, dict[str, float]] | Outcome:
        """Steps 2 and 3; what was generated, or what became of the job when it ended here."""
        timings = {"queue_wait_s": round(started_at - record.created_at, 4)}
        try:
            # 2. The stored request is re-checked: it is what the caller was told would run.
            #    Its inputs may have been decoded while the job before it generated.
            request = self._request(record)
            t0 = time.perf_counter()
            with tracing.span("inputs"):
                inputs = self._inputs(job_id, request, timings)
            if inputs:
                timings["inputs_s"] = round(time.perf_counter() - t0, 4)
            # Room for the request's predicted peak beside the resident models, or the job is
            # handed to a bigger class (``DoesNotFit``, a MemoryError) before anything runs.
            with tracing.span("checkout"):
                checkout = self.pool.get(request.model, work_of(request, get_model(request.model)))
            if checkout.loaded:
                # A cold start: reading the weights, and moving them to the device.
                timings["load_s"] = round(checkout.load_s, 4)
                timings["load_read_s"] = round(checkout.load_s - checkout.to_device_s, 4)
                timings["load_to_device_s"] = round(checkout.to_device_s, 4)
            worker, attempt, drain = self.worker_name, record.attempt, self.drain_key
            # Preprocessing the request's media into the pipeline's inputs, where the model has
            # any: its stages are reported (thinned out to events by ``Throttle``) and it stops
            # at the first frame after a cancel, as the pipeline does at a step.
            throttle = Throttle(self.stage_interval_s)

            def on_progress(stage: str, done: int, total: int) -> None:
                if throttle.due(stage):
                    state = self.store.progress(
                        job_id, done, total, drain, worker=worker, attempt=attempt, stage=stage
                    )
                else:
                    state = self.store.check(job_id, drain, worker=worker, attempt=attempt)
                _obey(state)

            with tracing.span("prepare"):
                inputs = checkout.adapter.prepare(request, inputs, timings, on_progress)

            # 3. Generate, reporting every step; stop at the first step after a cancel, or hand
            #    the job back at the first step after this worker began shutting down.
            def on_step(step: int, total: int) -> None:
                _obey(self.store.progress(job_id, step, total, drain, worker=worker, attempt=attempt))
                if self.ahead is not None:
                    self.ahead.kick(job_id)

            if self.ahead is not None:
                self.ahead.kick(job_id, now=True)
            t0 = time.perf_counter()
            try:
                with tracing.span("generate", steps=getattr(request, "steps", None)):
                    with job_context(checkout.adapter, request, self.storage, timings):
                        generated = checkout.adapter.run(request, inputs, on_step)
                timings.update(getattr(generated, "timings", {}))
            finally:
                self.busy.pipeline(time.perf_counter() - t0)
            timings["inference_s"] = round(time.perf_counter() - t0, 4)
            _held(timings, started_at)  # what follows (encode, store, record) is the CPU's
        except Superseded:
            log.warning("job %s was handed on while this worker ran it; leaving it", job_id)
            return self._skipped(job_id)
        except JobCanceled:
            return self._finish(record, JobStatus.CANCELED, timings, started_at)
        except HandBack:
            reason = f"worker {self.worker_name} shut down"
            moved = hand_back(self.store, job_id, self.worker_name, reason, attempt=record.attempt)
            if moved is JobStatus.CANCELED:
                return Ended(JobStatus.CANCELED)
            if moved is JobStatus.QUEUED:
                return Requeued("handed_back", record.queue, reason)
            return self._skipped(job_id)
        except Exception as exc:  # a model failure is the job's result, not the worker's
            return self._fail(record, exc, Phase.GENERATE, timings, started_at)
        return request, generated, timings

    def _complete(
        self,
        job_id: str,
        record: JobRecord,
        started_at: float,
        request: RequestBase,
        generated: Generated,
        timings: dict[str, float],
        parent: str | None = None,
    ) -> Outcome:
        """Step 4: encode and store under keys of this attempt, then record the outcome. Only the
        attempt that owns the job can record its outputs: a stale one (this worker was thought
        dead and the job ran again) deletes what it stored, and the owner's success deletes what
        earlier attempts left, so the job's objects are its outputs and nothing else."""
        try:
            with tracing.span("store", parent, job_id=job_id):  # on the finisher's thread
                outcome = self._store_and_record(job_id, record, started_at, request, generated, timings)
            return self._report(job_id, outcome)
        finally:
            self._done_with_job()

    def _store_and_record(
        self,
        job_id: str,
        record: JobRecord,
        started_at: float,
        request: RequestBase,
        generated: Generated,
        timings: dict[str, float],
    ) -> Outcome:
        try:
            outputs = self._store_outputs(job_id, record.attempt, request, generated, timings)
        except Exception as exc:  # a failure to encode or store is the job's result, not the worker's
            return self._fail(record, exc, Phase.STORE, timings, started_at)
        outcome = self._finish(record, JobStatus.SUCCEEDED, timings, started_at, outputs=outputs)
        if outcome != Ended(JobStatus.SUCCEEDED):
            self._delete(job_id, [o.key for o in outputs])
            return outcome
        if record.attempt > 1:
            kept = {o.key for o in outputs}
            self._delete(job_id, [key for key in self.storage.list(f"jobs/{job_id}/") if key not in kept])
        # What the next ETAs are priced with: the run without any model load.
        run_s = timings["run_s"] - timings.get("load_s", 0.0)
        record_duration(self.store.client, self.store.keys, request.model, self.pool.vram_class, run_s)
        return outcome

    def _fail(
        self,
        record: JobRecord,
        exc: BaseException,
        phase: Phase,
        timings: dict[str, float],
        started_at: float,
    ) -> Outcome:
        """The job raised ``exc`` in ``phase``: escalate it, or record it failed (``failure``)."""
        found = failure(exc, phase)
        if found.escalate:
            return self._escalate(record, found.error, timings, started_at)
        if found.error.type not in (ErrorType.TIME_LIMIT, ErrorType.INVALID_REQUEST):
            log.error("job %s failed in %s", record.id, phase.value, exc_info=exc)
        return self._finish(record, JobStatus.FAILED, timings, started_at, error=found.error)

    def _delete(self, job_id: str, keys: list[str]) -> None:
        """Delete objects that are not the job's outputs (a stale or earlier attempt's)."""
        for key in keys:
            try:
                self.storage.delete(key)
            except StorageError:  # left for the store's retention rules; never the job's outputs
                log.warning("job %s: deleting %s failed", job_id, key, exc_info=True)
        if keys:
            log.warning("job %s: deleted %d objects of another attempt", job_id, len(keys))

    def _done_with_job(self) -> None:
        """The job no longer occupies this worker: count the new seconds in the class's totals."""
        busy_s, work_s = self.busy.take_new()
        if work_s > 0 or busy_s > 0:
            vram_class = self.pool.vram_class.value
            with self.store.client.pipeline(transaction=False) as pipe:
                pipe.hincrbyfloat(
                    self.store.keys.metrics("gpu_busy"), encode_label(vram_class, "busy_s"), busy_s
                )
                pipe.hincrbyfloat(
                    self.store.keys.metrics("gpu_busy"), encode_label(vram_class, "work_s"), work_s
                )
                pipe.execute()

    def _report(self, job_id: str, outcome: Outcome) -> Outcome:
        """Tell the monitor (Flower) what became of the job, once its record says so: its end
        and error, or why it went back to a queue (``handed_back``, ``escalated``)."""
        if self.on_outcome is None or isinstance(outcome, Skipped | Finishing):
            return outcome
        if isinstance(outcome, Requeued):
            status, error = JobStatus.QUEUED, {"type": outcome.why, "message": outcome.message}
        else:
            status, error = outcome.status, None
            if outcome.error is not None:
                e = outcome.error
                error = {"type": e.type.value, "message": e.message, "where": e.where}
        try:
            self.on_outcome(job_id, status, error)
        except Exception:  # telling the monitor must never change what became of the job
            log.warning("job %s: reporting its outcome failed", job_id, exc_info=True)
        return outcome

    def _skipped(self, job_id: str) -> Skipped:
        """Another run changed the job first: where it is now."""
        try:
            return Skipped(self.store.get(job_id).status)
        except NotFound:
            return Skipped(None)

    def _claim(self, job_id: str) -> tuple[JobRecord, float] | Outcome:
        """The job's record as this worker claimed it (its attempt is this run's), and when."""
        try:
            record = self.store.get(job_id)
        except NotFound:
            log.warning("job %s has no record; dropping its message", job_id)
            return Skipped(None)
        if record.status.is_terminal():
            return Skipped(record.status)
        if record.status is JobStatus.RUNNING and record.worker and alive(self.store, record.worker):
            # A second copy of the message (the broker's visibility timeout ran out on a long
            # job): the job is in good hands; running it again would make a second output.
            return Skipped(record.status, holder=record.worker)
        if record.attempt >= self.max_attempts:
            return self._give_up(record)
        started_at = time.time()
        if record.status is JobStatus.QUEUED and started_at - record.created_at > self.max_wait_s:
            return self._expire(record, started_at)
        try:
            moved = self.store.move(job_id, lifecycle.claim(record, self.worker_name, started_at))
        except Conflict:
            # Canceled, finished or taken between the read and the claim: nothing to run.
            return self._skipped(job_id)
        if moved.target is JobStatus.CANCELED:  # its dead worker was asked to cancel it
            return Ended(JobStatus.CANCELED)
        claimed = replace(
            record, status=JobStatus.RUNNING, attempt=record.attempt + 1, worker=self.worker_name
        )
        return claimed, started_at

    def _expire(self, record: JobRecord, now: float) -> Outcome:
        waited = now - record.created_at
        reason = f"waited {waited:.0f} s in the queue, longer than the fleet's {self.max_wait_s} s"
        error = JobError(type=ErrorType.EXPIRED, message=reason)
        try:
            self.store.move(record.id, lifecycle.expire(error, now))
        except Conflict:
            return self._skipped(record.id)
        return Ended(JobStatus.FAILED, error)

    def _give_up(self, record: JobRecord) -> Outcome:
        """Fail the job as ``too_many_attempts`` and dead-letter it, in one atomic step; a job
        whose cancel was asked for while it ran ends ``canceled`` instead, as asked."""
        reason = f"gave up after {record.attempt} attempts: the worker died or was stopped each time"
        error = JobError(type=ErrorType.TOO_MANY_ATTEMPTS, message=reason)
        now = time.time()
        entry = {"id": record.id, "attempts": record.attempt, "reason": reason, "at": now}
        try:
            moved = self.store.move(
                record.id, lifecycle.give_up(error, now, lifecycle.DeadLetter(entry, self.max_dead_letters))
            )
        except Conflict:
            return self._skipped(record.id)
        if moved.target is JobStatus.CANCELED:
            return Ended(JobStatus.CANCELED)
        log.error("job %s dead-lettered: %s", record.id, reason)
        return Ended(JobStatus.FAILED, error)

    def _escalate(
        self, record: JobRecord, error: JobError, timings: dict[str, float], started_at: float
    ) -> Outcome:
        """Out of GPU memory: send the job to the next bigger class, once per class."""
        job_id = record.id
        current, priority = parse_queue(record.queue)
        target = escalate(current)
        if target is None:
            return self._finish(record, JobStatus.FAILED, timings, started_at, error=error)
        new_queue = queue_name(target.vram_class, priority)
        escalations = [
            *self.store.get(job_id).escalations,
            {"from": current.value, "to": target.vram_class.value, "at": time.time()},
        ]
        move = lifecycle.escalate(
            new_queue, escalations, error, owner=self.worker_name, attempt=record.attempt
        )
        try:
            moved = self.store.move(job_id, move)
        except Conflict:
            return self._skipped(job_id)
        if moved.target is JobStatus.CANCELED:
            log.warning("job %s ran out of memory after its cancel was asked for; canceled", job_id)
            return Ended(JobStatus.CANCELED)
        log.warning(
            "job %s ran out of memory on %s; escalated to %s (%s)",
            job_id,
            current.value,
            new_queue,
            error.message,
        )
        return Requeued("escalated", new_queue, f"out of memory: to {new_queue}")

    def _inputs(self, job_id: str, request: RequestBase, timings: dict[str, float]) -> Inputs:
        ahead = self.ahead.take(job_id) if self.ahead is not None else None
        if ahead is None:
            return self._load_inputs(request, job_id)
        inputs, timings["inputs_ahead_s"] = ahead
        return inputs

    def _decode_ahead(self, job_id: str) -> tuple[Inputs, float] | None:
        """The decoded inputs of a job still waiting in a queue, and the seconds they took; None
        for a job without input media (or not waiting any more)."""
        record = self.store.get(job_id)
        if record.status is not JobStatus.QUEUED:
            return None
        request = self._request(record)
        if not request.media_fields():
            return None
        t0 = time.perf_counter()
        inputs = self._load_inputs(request, job_id)
        log.info("decoded the inputs of job %s ahead", job_id)
        return inputs, round(time.perf_counter() - t0, 4)

    def _request(self, record: JobRecord) -> RequestBase:
        """The stored request, checked under the limits it was accepted under: a job the API
        accepted is never refused because this worker's settings are tighter."""
        return parse_request(record.request, limits=record.limits or self.limits)

    def _load_inputs(self, request: RequestBase, job_id: str) -> Inputs:
        """The request's input media from the store (checked at submit): decoded, with the bytes
        and the job's id alongside for adapters that hand them on."""
        stored = {
            name: [self.storage.get(ref.key) for ref in value]
            if isinstance(value, list)
            else self.storage.get(value.key)
            for name, value in request.media_fields().items()
        }
        # Video frames are kept at most at the output's size: what the submit check counted.
        output_pixels = request.width * request.height if request.width and request.height else None
        return Inputs.decode(stored, job_id=job_id, max_video_pixels=output_pixels)

    def _store_outputs(
        self, job_id: str, attempt: int, request: RequestBase, generated: Generated, timings: dict[str, float]
    ) -> list[Output]:
        encoding = output_files.Encoding.of(request)
        return output_files.store(self.storage, job_id, attempt, generated, encoding, timings)

    def _finish(
        self,
        record: JobRecord,
        status: JobStatus,
        timings: dict[str, float],
        started_at: float,
        outputs: list[Output] | None = None,
        error: JobError | None = None,
    ) -> Outcome:
        finished_at = time.time()
        timings["run_s"] = round(finished_at - started_at, 4)
        if "held_s" not in timings:  # it ended before its outputs (failed, canceled)
            _held(timings, started_at, finished_at)
        # Only while this worker still runs the job as this attempt: one the reaper handed on
        # (this worker was thought dead) now belongs to another, whose outcome counts.
        move = lifecycle.finish(
            status,
            owner=self.worker_name,
            attempt=record.attempt,
            finished_at=finished_at,
            timings=timings,
            outputs=outputs,
            error=error,
        )
        # The job's message is acknowledged: its end is written here or nowhere. A refused write
        # (read only, out of memory, an outage past the connection's retries) is tried again
        # until it lands, the job is no longer this run's, or the job is past the time the
        # expiry sweep ends it anyway.
        give_up_at = started_at + self.max_run_s + FINISH_GRACE_S
        wait_s = FINISH_RETRY_S
        while True:
            try:
                self.store.move(record.id, move)
            except Conflict as exc:
                log.warning("job %s: %s", record.id, exc)
                return self._skipped(record.id)
            except redis.RedisError as exc:
                if time.time() + wait_s > give_up_at:
                    log.error(
                        "job %s: its end was never written (%s); the expiry sweep ends it", record.id, exc
                    )
                    return Skipped(JobStatus.RUNNING)
                log.warning("job %s: writing its end failed (%s); again in %.1f s", record.id, exc, wait_s)
                time.sleep(wait_s)
                wait_s = min(wait_s * 2, FINISH_RETRY_CAP_S)
                continue
            return Ended(status, error)


def _obey(state: Step) -> None:
    """Stop the job where the store says to, by raising what ``_generate`` handles."""
    if state.superseded or state.status is not JobStatus.RUNNING:
        raise Superseded()  # handed on while this worker still ran it
    if state.cancel:
        raise JobCanceled()
    if state.drain:
        raise HandBack()


def _error(kind: ErrorType, exc: BaseException) -> JobError:
    return JobError(
        type=kind,
        exception=type(exc).__name__,
        message=str(exc) or type(exc).__name__,
        where="".join(traceback.format_exception_only(type(exc), exc)).strip()[:500],
    )


def _out_of_memory(exc: BaseException) -> bool:
    """CUDA out of memory (torch's own type when torch is loaded), or a model that does not fit
    this worker's class at all."""
    import sys

    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    return isinstance(exc, MemoryError) or (oom_type is not None and isinstance(exc, oom_type))


def _held(timings: dict[str, float], started_at: float, now: float | None = None) -> None:
    """``timings["held_s"]``: seconds the job has held this worker since its claim, less the
    model's load when it found it cold (the fleet's cost, not the request's): the GPU time a
    tenant's usage counts (``routing.jobs.usage``)."""
    held = (time.time() if now is None else now) - started_at - timings.get("load_s", 0.0)
    timings["held_s"] = round(max(held, 0.0), 4)
