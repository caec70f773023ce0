"""Runs one job: claim it, generate, store the outputs, record the outcome.

A model failure is a job result (``failed`` with a reason the caller can act on), never a worker
crash; only a broken worker (the process dies) is fatal, and then the broker hands the job back.

The GPU does not wait on the CPU: step 4 (encode, store, record) runs on the finisher's thread
(``worker.finisher``) while the caller takes the next job and generates it, and the next job's
input media are decoded while this one generates (``worker.ahead``). A job is finished only
when its record says so, which step 4 writes after the outputs are stored.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from functools import partial

from celery.exceptions import SoftTimeLimitExceeded

from routing.classes import parse_queue, queue_name
from routing.decision import escalate
from routing.errors import Conflict, ErrorType, InvalidRequest, JobError, NotFound
from routing.io.storage import Storage, StorageError
from routing.jobs.eta import record_duration
from routing.jobs.store import JobRecord, JobStatus, JobStore, Output
from routing.schemas import RequestBase, parse_request
from worker import outputs as output_files
from worker.adapters.base import Generated, Inputs, JobCanceled
from worker.ahead import DecodeAhead
from worker.busy import BusyMeter
from worker.finisher import Finisher
from worker.liveness import alive, hand_back
from worker.pool import PipelinePool
from worker.speed import job_context

log = logging.getLogger(__name__)

# Told what became of a job once its record says so: (job id, SUCCEEDED | FAILED | CANCELED,
# the error) for a final state, (job id, QUEUED, the reason) for a job handed back to a queue.
OutcomeHook = Callable[[str, JobStatus, dict[str, str] | None], None]


class HandBack(Exception):
    """Raised from the step callback: the worker is shutting down; give the job back."""


class Superseded(Exception):
    """Raised from the step callback: the job is no longer this worker's (the reaper thought it
    dead and handed the job on); stop without touching the record."""


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
    ):
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

    def run(self, job_id: str) -> str:
        """Run ``job_id`` to a terminal state, or hand it on; returns what became of it
        ("finishing" once step 4 is under way on the finisher's thread)."""
        # 1. Claim it, unless it is finished, canceled, or alive on another worker.
        claimed = self._claim(job_id)
        if isinstance(claimed, str):
            return claimed
        record, started_at = claimed
        self.busy.job_started(started_at, record.created_at)
        finishing = False
        try:
            try:
                generated = self._generate(job_id, record, started_at)
            finally:
                self.busy.gpu_done()  # what is left (encode, store, record) is the CPU's
            if isinstance(generated, str):
                return generated
            # 4. Encode and store, then record: on the finisher's thread, while this one takes
            #    the next job (it waits here while max_pending_outputs jobs are finishing).
            try:
                status = self.finisher.submit(partial(self._complete, job_id, record, started_at, *generated))
            except SoftTimeLimitExceeded as exc:
                _, _, timings = generated
                return self._finish(
                    record, JobStatus.FAILED, timings, started_at, error=_error(ErrorType.TIME_LIMIT, exc)
                )
            finishing = True
            return status or "finishing"
        finally:
            if not finishing:
                self._done_with_job()

    def _generate(
        self, job_id: str, record: JobRecord, started_at: float
    ) -> tuple[RequestBase, Generated, dict[str, float]] | str:
        """Steps 2 and 3; what was generated, or what became of the job when it ended here."""
        timings = {"queue_wait_s": round(started_at - record.created_at, 4)}
        try:
            # 2. The stored request is re-checked: it is what the caller was told would run.
            #    Its inputs may have been decoded while the job before it generated.
            request = parse_request(record.request)
            t0 = time.perf_counter()
            inputs = self._inputs(job_id, request, timings)
            if inputs:
                timings["inputs_s"] = round(time.perf_counter() - t0, 4)
            checkout = self.pool.get(request.model)
            if checkout.loaded:
                # A cold start: reading the weights, and moving them to the device.
                timings["load_s"] = round(checkout.load_s, 4)
                timings["load_read_s"] = round(checkout.load_s - checkout.to_device_s, 4)
                timings["load_to_device_s"] = round(checkout.to_device_s, 4)

            # 3. Generate, reporting every step; stop at the first step after a cancel, or hand
            #    the job back at the first step after this worker began shutting down.
            def on_step(step: int, total: int) -> None:
                state = self.store.progress(
                    job_id, step, total, self.drain_key, worker=self.worker_name, attempt=record.attempt
                )
                if state.superseded or state.status is not JobStatus.RUNNING:
                    raise Superseded()  # handed on while this worker still ran it
                if state.cancel:
                    raise JobCanceled()
                if state.drain:
                    raise HandBack()
                if self.ahead is not None:
                    self.ahead.kick(job_id)

            if self.ahead is not None:
                self.ahead.kick(job_id, now=True)
            t0 = time.perf_counter()
            try:
                with job_context(checkout.adapter, request, self.storage, timings):
                    generated = checkout.adapter.run(request, inputs, on_step)
            finally:
                self.busy.pipeline(time.perf_counter() - t0)
            timings["inference_s"] = round(time.perf_counter() - t0, 4)
        except Superseded:
            log.warning("job %s was handed on while this worker ran it; leaving it", job_id)
            return f"skipped ({self.store.get(job_id).status.value})"
        except JobCanceled:
            return self._finish(record, JobStatus.CANCELED, timings, started_at)
        except HandBack:
            reason = f"worker {self.worker_name} shut down"
            moved = hand_back(self.store, job_id, self.worker_name, reason, attempt=record.attempt)
            if moved is JobStatus.CANCELED:
                self._tell(job_id, JobStatus.CANCELED, None)
                return moved.value
            if moved is JobStatus.QUEUED:
                self._tell(job_id, JobStatus.QUEUED, {"type": "handed_back", "message": reason})
                return "handed back"
            return f"skipped ({self.store.get(job_id).status.value})"
        except SoftTimeLimitExceeded as exc:
            return self._finish(
                record, JobStatus.FAILED, timings, started_at, error=_error(ErrorType.TIME_LIMIT, exc)
            )
        except InvalidRequest as exc:
            return self._finish(
                record, JobStatus.FAILED, timings, started_at, error=_error(ErrorType.INVALID_REQUEST, exc)
            )
        except Exception as exc:  # a model failure is the job's result, not the worker's
            if _out_of_memory(exc):
                return self._escalate(record, exc, timings, started_at)
            log.exception("job %s failed", job_id)
            return self._finish(
                record,
                JobStatus.FAILED,
                timings,
                started_at,
                error=_error(getattr(exc, "error_type", ErrorType.MODEL_ERROR), exc),
            )
        return request, generated, timings

    def _complete(
        self,
        job_id: str,
        record: JobRecord,
        started_at: float,
        request: RequestBase,
        generated: Generated,
        timings: dict[str, float],
    ) -> str:
        """Step 4: encode and store under keys of this attempt, then record the outcome. Only the
        attempt that owns the job can record its outputs: a stale one (this worker was thought
        dead and the job ran again) deletes what it stored, and the owner's success deletes what
        earlier attempts left, so the job's objects are its outputs and nothing else."""
        try:
            try:
                outputs = self._store_outputs(job_id, record.attempt, request, generated, timings)
            except SoftTimeLimitExceeded as exc:
                return self._finish(
                    record, JobStatus.FAILED, timings, started_at, error=_error(ErrorType.TIME_LIMIT, exc)
                )
            except Exception as exc:  # a model failure is the job's result, not the worker's
                if _out_of_memory(exc):
                    return self._escalate(record, exc, timings, started_at)
                log.exception("job %s failed", job_id)
                return self._finish(
                    record, JobStatus.FAILED, timings, started_at, error=_error(ErrorType.MODEL_ERROR, exc)
                )
            status = self._finish(record, JobStatus.SUCCEEDED, timings, started_at, outputs=outputs)
            if status != JobStatus.SUCCEEDED.value:
                self._delete(job_id, [o.key for o in outputs])
                return status
            if record.attempt > 1:
                kept = {o.key for o in outputs}
                self._delete(job_id, [key for key in self.storage.list(f"jobs/{job_id}/") if key not in kept])
            # What the next ETAs are priced with: the run without any model load.
            run_s = timings["run_s"] - timings.get("load_s", 0.0)
            record_duration(self.store.client, self.store.keys, request.model, self.pool.vram_class, run_s)
            return status
        finally:
            self._done_with_job()

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
            field = f"{self.pool.vram_class.value}|"
            with self.store.client.pipeline(transaction=False) as pipe:
                pipe.hincrbyfloat(self.store.keys.metrics("gpu_busy"), field + "busy_s", busy_s)
                pipe.hincrbyfloat(self.store.keys.metrics("gpu_busy"), field + "work_s", work_s)
                pipe.execute()

    def _tell(self, job_id: str, status: JobStatus, error: JobError | dict[str, str] | None) -> None:
        """Tell the monitor (Flower) what became of the job; ``error`` is the recorded error, or
        why a job went back to a queue (``handed_back``, ``escalated``)."""
        if self.on_outcome is None:
            return
        if isinstance(error, JobError):
            error = {"type": error.type.value, "message": error.message, "where": error.where}
        try:
            self.on_outcome(job_id, status, error)
        except Exception:  # telling the monitor must never change what became of the job
            log.warning("job %s: reporting its outcome failed", job_id, exc_info=True)

    def _claim(self, job_id: str) -> tuple[JobRecord, float] | str:
        """The job's record as this worker claimed it (its attempt is this run's), and when."""
        try:
            record = self.store.get(job_id)
        except NotFound:
            log.warning("job %s has no record; dropping its message", job_id)
            return "missing"
        if record.status.is_terminal():
            return f"skipped ({record.status.value})"
        if record.status is JobStatus.RUNNING and record.worker and alive(self.store, record.worker):
            # A second copy of the message (the broker's visibility timeout ran out on a long
            # job): the job is in good hands; running it again would make a second output.
            return f"skipped (running on {record.worker})"
        if record.attempt >= self.max_attempts:
            return self._give_up(record)
        started_at = time.time()
        if record.status is JobStatus.QUEUED and started_at - record.created_at > self.max_wait_s:
            return self._expire(record, started_at)
        try:
            moved = self.store.transition(
                job_id,
                JobStatus.RUNNING,
                count_attempt=True,
                expect_worker=record.worker if record.status is JobStatus.RUNNING else None,
                expect_attempt=record.attempt,
                started_at=started_at,
                worker=self.worker_name,
                cancel_requested=0,
            )
        except Conflict:
            # Canceled, finished or taken between the read and the claim: nothing to run.
            return f"skipped ({self.store.get(job_id).status.value})"
        if moved.target is JobStatus.CANCELED:  # its dead worker was asked to cancel it
            self._tell(job_id, JobStatus.CANCELED, None)
            return moved.target.value
        claimed = replace(
            record, status=JobStatus.RUNNING, attempt=record.attempt + 1, worker=self.worker_name
        )
        return claimed, started_at

    def _expire(self, record: JobRecord, now: float) -> str:
        waited = now - record.created_at
        reason = f"waited {waited:.0f} s in the queue, longer than the fleet's {self.max_wait_s} s"
        error = JobError(type=ErrorType.EXPIRED, message=reason)
        try:
            self.store.transition(
                record.id, JobStatus.FAILED, only_from=JobStatus.QUEUED, finished_at=now, error=error
            )
        except Conflict:
            return f"skipped ({self.store.get(record.id).status.value})"
        self._tell(record.id, JobStatus.FAILED, error)
        return "expired"

    def _give_up(self, record: JobRecord) -> str:
        """Fail the job as ``too_many_attempts`` and dead-letter it, in one atomic step; a job
        whose cancel was asked for while it ran ends ``canceled`` instead, as asked."""
        reason = f"gave up after {record.attempt} attempts: the worker died or was stopped each time"
        error = JobError(type=ErrorType.TOO_MANY_ATTEMPTS, message=reason)
        now = time.time()
        entry = {"id": record.id, "attempts": record.attempt, "reason": reason, "at": now}
        dead_letter = (self.store.keys.dead_letters, json.dumps(entry), self.max_dead_letters)
        try:
            moved = self.store.transition(
                record.id,
                JobStatus.FAILED,
                cancel_wins=True,
                dead_letter=dead_letter,
                finished_at=now,
                error=error,
            )
        except Conflict:
            return f"skipped ({self.store.get(record.id).status.value})"
        if moved.target is JobStatus.CANCELED:
            self._tell(record.id, JobStatus.CANCELED, None)
            return moved.target.value
        log.error("job %s dead-lettered: %s", record.id, reason)
        self._tell(record.id, JobStatus.FAILED, error)
        return "dead-lettered"

    def _escalate(
        self, record: JobRecord, exc: BaseException, timings: dict[str, float], started_at: float
    ) -> str:
        """Out of GPU memory: send the job to the next bigger class, once per class."""
        job_id = record.id
        current, priority = parse_queue(record.queue)
        target = escalate(current)
        if target is None:
            return self._finish(
                record, JobStatus.FAILED, timings, started_at, error=_error(ErrorType.OUT_OF_MEMORY, exc)
            )
        new_queue = queue_name(target.vram_class, priority)
        escalations = [
            *self.store.get(job_id).escalations,
            {"from": current.value, "to": target.vram_class.value, "at": time.time()},
        ]
        try:
            moved = self.store.transition(
                job_id,
                JobStatus.QUEUED,
                expect_worker=self.worker_name,
                expect_attempt=record.attempt,
                requeue=self.store.messages.run_job(job_id, new_queue),
                queue=new_queue,
                escalations=escalations,
                error=_error(ErrorType.OUT_OF_MEMORY, exc),
            )
        except Conflict:
            return f"skipped ({self.store.get(job_id).status.value})"
        if moved.target is JobStatus.CANCELED:
            log.warning("job %s ran out of memory after its cancel was asked for; canceled", job_id)
            self._tell(job_id, JobStatus.CANCELED, None)
            return moved.target.value
        log.warning("job %s ran out of memory on %s; escalated to %s", job_id, current.value, new_queue)
        self._tell(
            job_id, JobStatus.QUEUED, {"type": "escalated", "message": f"out of memory: to {new_queue}"}
        )
        return f"escalated to {new_queue}"

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
        request = parse_request(record.request)
        if not request.media_fields():
            return None
        t0 = time.perf_counter()
        inputs = self._load_inputs(request, job_id)
        log.info("decoded the inputs of job %s ahead", job_id)
        return inputs, round(time.perf_counter() - t0, 4)

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
    ) -> str:
        job_id = record.id
        finished_at = time.time()
        timings["run_s"] = round(finished_at - started_at, 4)
        fields: dict[str, object] = {"finished_at": finished_at, "timings": timings}
        if outputs is not None:
            fields["outputs"] = outputs
        if error is not None:
            fields["error"] = error
        elif status is JobStatus.SUCCEEDED:
            fields["error"] = None  # an escalated job's out-of-memory error is history now
        try:
            # Only while this worker still runs the job as this attempt: one the reaper handed on
            # (this worker was thought dead) now belongs to another, whose outcome counts.
            self.store.transition(
                job_id,
                status,
                only_from=JobStatus.RUNNING,
                expect_worker=self.worker_name,
                expect_attempt=record.attempt,
                **fields,
            )
        except Conflict as exc:
            log.warning("job %s: %s", job_id, exc)
            return f"skipped ({self.store.get(job_id).status.value})"
        self._tell(job_id, status, error)
        return status.value


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
