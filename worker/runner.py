"""Runs one job: claim it, generate, store the outputs, record the outcome.

A model failure is a job result (``failed`` with a reason the caller can act on), never a worker
crash; only a broken worker (the process dies) is fatal, and then the broker hands the job back.
"""

from __future__ import annotations

import logging
import time
import traceback

from routing.errors import Conflict, InvalidRequest, NotFound
from routing.eta import record_duration
from routing.jobs import JobStatus, JobStore, Output
from routing.schemas import AUDIO_FIELDS, VIDEO_FIELDS, RequestBase, parse_request
from routing.storage import Storage, output_key
from worker.adapters.base import Generated, Inputs, JobCanceled
from worker.media import decode_image, decode_video, encode_mp4, encode_png
from worker.pool import PipelinePool

log = logging.getLogger(__name__)


class JobRunner:
    def __init__(self, store: JobStore, storage: Storage, pool: PipelinePool, worker_name: str):
        self.store = store
        self.storage = storage
        self.pool = pool
        self.worker_name = worker_name

    def run(self, job_id: str) -> str:
        """Run ``job_id`` to a terminal state; returns that state's name (or why it was skipped)."""
        # 1. Claim: queued -> running, or running -> running when a dead worker's job comes back.
        try:
            record = self.store.get(job_id)
        except NotFound:
            log.warning("job %s has no record; dropping its message", job_id)
            return "missing"
        if record.status.is_terminal():
            return f"skipped ({record.status.value})"
        started_at = time.time()
        try:
            self.store.transition(
                job_id, JobStatus.RUNNING, count_attempt=True, started_at=started_at, worker=self.worker_name
            )
        except Conflict:
            # Canceled (or finished) between the read and the claim: nothing to run.
            return f"skipped ({self.store.get(job_id).status.value})"
        timings = {"queue_wait_s": round(started_at - record.created_at, 4)}

        try:
            # 2. The stored request is re-checked: it is what the caller was told would run.
            request = parse_request(record.request)
            t0 = time.perf_counter()
            inputs = self._load_inputs(request)
            if inputs:
                timings["inputs_s"] = round(time.perf_counter() - t0, 4)
            checkout = self.pool.get(request.model)
            if checkout.loaded:
                timings["load_s"] = round(checkout.load_s, 4)

            # 3. Generate, reporting every step and stopping at the first one after a cancel.
            def on_step(step: int, total: int) -> None:
                _status, stop = self.store.progress(job_id, step, total)
                if stop:
                    raise JobCanceled()

            t0 = time.perf_counter()
            generated = checkout.adapter.run(request, inputs, on_step)
            timings["inference_s"] = round(time.perf_counter() - t0, 4)

            # 4. Encode and store under keys derived from the job id: a redelivered job
            #    overwrites its own outputs, it never adds a second set.
            outputs = self._store_outputs(job_id, generated, timings)
        except JobCanceled:
            return self._finish(job_id, JobStatus.CANCELED, timings, started_at)
        except InvalidRequest as exc:
            return self._finish(
                job_id, JobStatus.FAILED, timings, started_at, error=_error("invalid_request", exc)
            )
        except Exception as exc:  # a model failure is the job's result, not the worker's
            log.exception("job %s failed", job_id)
            return self._finish(
                job_id, JobStatus.FAILED, timings, started_at, error=_error("model_error", exc)
            )
        status = self._finish(job_id, JobStatus.SUCCEEDED, timings, started_at, outputs=outputs)
        # What the next ETAs are priced with: the run without any model load.
        run_s = timings["run_s"] - timings.get("load_s", 0.0)
        record_duration(self.store.client, self.store.keys, request.model, self.pool.vram_class, run_s)
        return status

    def _load_inputs(self, request: RequestBase) -> Inputs:
        """Decode the request's input media from the store (checked at submit)."""
        inputs: Inputs = {}
        for name, value in request.media_fields().items():
            if isinstance(value, list):
                inputs[name] = [decode_image(self.storage.get(ref.key)) for ref in value]
            elif name in AUDIO_FIELDS:
                inputs[name] = self.storage.get(value.key)  # kept encoded: muxed into the output as is
            elif name in VIDEO_FIELDS:
                inputs[name], inputs[f"{name}_fps"] = decode_video(self.storage.get(value.key))
            else:
                inputs[name] = decode_image(self.storage.get(value.key))
        return inputs

    def _store_outputs(self, job_id: str, generated: Generated, timings: dict[str, float]) -> list[Output]:
        t0 = time.perf_counter()
        if generated.encoded is not None:
            encoded = [("mp4", "video/mp4", generated.encoded, generated.width, generated.height)]
        elif generated.frames:
            first = generated.frames[0]
            data = encode_mp4(generated.frames, generated.fps, audio=generated.audio)
            encoded = [("mp4", "video/mp4", data, first.width, first.height)]
        else:
            encoded = [("png", "image/png", encode_png(im), im.width, im.height) for im in generated.images]
        timings["encode_s"] = round(time.perf_counter() - t0, 4)
        t0 = time.perf_counter()
        outputs = []
        for index, (ext, content_type, data, width, height) in enumerate(encoded):
            stored = self.storage.put(output_key(job_id, index, ext), data, content_type)
            frame_count = len(generated.frames) or generated.frame_count
            video = {"frames": frame_count, "fps": generated.fps} if frame_count else {}
            outputs.append(
                Output(
                    stored.key, content_type, stored.size_bytes, width, height, seed=generated.seed, **video
                )
            )
        timings["store_s"] = round(time.perf_counter() - t0, 4)
        return outputs

    def _finish(
        self,
        job_id: str,
        status: JobStatus,
        timings: dict[str, float],
        started_at: float,
        outputs: list[Output] | None = None,
        error: dict[str, str] | None = None,
    ) -> str:
        finished_at = time.time()
        timings["run_s"] = round(finished_at - started_at, 4)
        fields: dict[str, object] = {"finished_at": finished_at, "timings": timings}
        if outputs is not None:
            fields["outputs"] = outputs
        if error is not None:
            fields["error"] = error
        try:
            self.store.transition(job_id, status, **fields)
        except Conflict as exc:
            log.warning("job %s: %s", job_id, exc)
            return f"skipped ({self.store.get(job_id).status.value})"
        return status.value


def _error(kind: str, exc: BaseException) -> dict[str, str]:
    return {
        "type": kind,
        "exception": type(exc).__name__,
        "message": str(exc) or type(exc).__name__,
        "where": "".join(traceback.format_exception_only(type(exc), exc)).strip()[:500],
    }
