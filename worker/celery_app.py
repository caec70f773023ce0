"""The worker's Celery app and its one GPU task.

Started by ``python -m worker`` (or ``celery -A worker.celery_app worker``). The parent process
never imports torch: models load in the pool child, so nothing forks after CUDA has started.

Shutdown: on SIGTERM the parent marks this worker as draining; the running job sees the mark at
its next step and hands itself back to its queue (another worker takes it at once), then the
worker exits. If no step comes within ``worker_soft_shutdown_timeout``, Celery's cold shutdown
returns the unacknowledged message instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.exceptions import Ignore
from celery.signals import (
    task_failure,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutting_down,
)

from routing import tracing
from routing.celery_config import RUN_JOB_TASK, make_celery
from routing.classes import VramClass, consumed_queues
from routing.errors import Conflict, ErrorType, JobError, NotFound
from routing.io.connection import Replication, connect
from routing.io.retention import RetentionSweep
from routing.io.storage import Storage, make_storage
from routing.jobs import lifecycle
from routing.jobs.codecs import encode_label
from routing.jobs.expiry import ExpirySweep
from routing.jobs.keys import Keys
from routing.jobs.messages import TaskMessages
from routing.jobs.store import JobStore
from routing.jobs.workers import worker_states
from routing.limits import RequestLimits
from routing.settings import Settings, get_settings
from worker import held, liveness
from worker.ahead import peek_next
from worker.busy import share
from worker.lost import LostSweep
from worker.outcomes import TaskOutcomes
from worker.pool import CudaMemory, PipelinePool
from worker.runner import JobRunner

log = logging.getLogger(__name__)

settings = get_settings()
vram_class = VramClass(settings.worker_class)
app = make_celery(settings, vram_class)
# Loading real weights takes minutes; the parent must not kill a child still warming up.
app.conf.worker_proc_alive_timeout = 900
# Time for the running job to reach a step and hand itself back before a cold shutdown.
app.conf.worker_soft_shutdown_timeout = 60.0
# The fleet's broker transport (worker.held), which also records the messages the main process
# takes as held by it, once ``_start_holding`` has named the holder.
held.use_transport(app, settings)

# How the worker makes its object store. A program that starts the worker itself may replace it
# first (the tests' slow store starts the worker through ``testkit.slow_worker``); the pool
# child, forked from that process, makes its store with it.
storage_factory: Callable[[Settings], Storage] = make_storage

_runner: JobRunner | None = None
_outcomes = TaskOutcomes(app)


def _store() -> JobStore:
    return JobStore(
        connect(settings),
        Keys(settings.key_prefix),
        ttl_s=settings.job_ttl_s,
        messages=TaskMessages(app),
        progress_webhook_interval_s=settings.progress_webhook_interval_s,
        usage_retention_days=settings.usage_retention_days,
        replication=Replication.of(settings),
    )


def get_runner() -> JobRunner:
    """The process's runner, built on first use (in the pool child, after the fork)."""
    global _runner
    if _runner is None:
        from worker.adapters import load_adapter
        from worker.adapters.base import Runtime
        from worker.weights import local_weights

        store = _store()
        storage = _storage()
        name = liveness.process_name(vram_class)
        runtime = Runtime.resolve(settings.device, settings.dtype)

        def load(spec: Any, placement: Any) -> Any:
            from routing.catalog import checkpoint_spec
            from routing.memory import Mode
            from worker.speed import prepare

            # Sharded: the torchrun group serves it, from the official checkpoint.
            sharded = placement.mode is Mode.SHARDED
            # Filled from the object store into the node cache first, when the worker has one.
            weights = local_weights(settings, checkpoint_spec(spec) if sharded else spec, storage)
            adapter = load_adapter(spec, weights, runtime.placed(placement), settings.adapters, sharded)
            if spec.key not in settings.adapters:  # adapters of one's own run base jobs only
                prepare(adapter, spec, vram_class, settings)  # compiled and warmed before any job
            return adapter

        def warm_work(spec: Any) -> Any:
            from worker.speed import warm_works

            return warm_works(spec, vram_class, settings, runtime.device)

        def count(change: str, model_key: str) -> None:
            counts = store.keys.load_counts if change == "load" else store.keys.eviction_counts
            # By class, not by worker process: a field per process would grow with every restart.
            store.client.hincrby(counts, f"{vram_class.value}:{model_key}", 1)
            if change == "load":  # cold-start seconds by phase, for the metrics
                load_s, to_device_s = pool.load_seconds[model_key]
                key = store.keys.metrics("load_s")
                with store.client.pipeline(transaction=False) as pipe:
                    pipe.hincrbyfloat(
                        key, encode_label(model_key, vram_class.value, "read"), load_s - to_device_s
                    )
                    pipe.hincrbyfloat(
                        key, encode_label(model_key, vram_class.value, "to_device"), to_device_s
                    )
                    pipe.hincrby(key, encode_label(model_key, vram_class.value, "count"), 1)
                    pipe.execute()

        pool = PipelinePool(
            load,
            vram_class,
            budget_gb=settings.vram_budget_gb,
            on_change=count,
            gpu=CudaMemory.of(runtime.device),
            margin_gib=settings.vram_margin_gib,
            # Only an h100x8 worker has a group (worker.group.adapter).
            group_models=settings.group_models if vram_class is VramClass.H100X8 else (),
            # The load's warm-up jobs need room too (worker.speed.prepare warms at the class's sizes).
            warm_work=warm_work,
        )
        queues = consumed_queues(vram_class)
        _runner = JobRunner(
            store,
            storage,
            pool,
            name,
            max_attempts=settings.max_attempts,
            max_wait_s=settings.max_wait_s,
            drain_key=store.keys.drain(liveness.process_name(vram_class, os.getppid())),
            max_pending_outputs=settings.max_pending_outputs,
            peek_next=(lambda: peek_next(store.client, queues)) if settings.decode_ahead else None,
            on_outcome=_outcomes.report,
            max_dead_letters=settings.max_dead_letters,
            limits=RequestLimits.from_settings(settings),
            max_run_s=settings.max_run_s,
            stage_interval_s=settings.preprocess_progress_interval_s,
        )
        runner = _runner
        expiry = ExpirySweep(store, settings.max_wait_s, settings.expiry_sweep_interval_s, settings.max_run_s)
        liveness.start(
            store,
            name,
            vram_class,
            settings.heartbeat_ttl_s,
            lambda: _state(pool, runner),
            sweep=RetentionSweep.for_settings(settings),
            expiry=expiry,
            lost=LostSweep(store, queues, settings.heartbeat_ttl_s),
        )
    return _runner


def _storage() -> Storage:
    return storage_factory(settings)


def _state(pool: PipelinePool, runner: JobRunner) -> dict[str, object]:
    busy_s, work_s = runner.busy.totals()
    state: dict[str, object] = {
        "resident": pool.resident,
        "resident_gb": pool.used_gb,
        # Seconds inside pipeline calls, out of seconds with work: the GPU-busy share.
        "gpu_busy_s": round(busy_s, 3),
        "gpu_work_s": round(work_s, 3),
        "gpu_busy_share": share(busy_s, work_s),
    }
    torch = sys.modules.get("torch")  # only once a model has loaded it
    if torch is not None and torch.cuda.is_available():
        state["gpu_memory_bytes"] = torch.cuda.memory_allocated()
        state["gpu_memory_reserved_bytes"] = torch.cuda.memory_reserved()
    return state


@worker_process_init.connect
def _warm(**_: Any) -> None:
    tracing.setup("fleet-worker", settings.otlp_endpoint)  # in the pool child: after the fork
    runner = get_runner()
    for model_key in settings.warm_models:
        runner.pool.get(model_key)


# In the main process: the messages it takes, recorded as they are taken so that the reaper can
# give them back at once if this worker dies holding them (worker.held).
_holder: held.Holder | None = None


@worker_init.connect
def _start_holding(**_: Any) -> None:
    # Before the consumer's broker connection is made: it reads the transport options then.
    global _holder
    _holder = held.Holder(
        connect(settings),
        Keys(settings.key_prefix),
        liveness.process_name(vram_class),
        settings.heartbeat_ttl_s,
    )
    app.conf.broker_transport_options = {**app.conf.broker_transport_options, **_holder.transport_options()}
    _holder.start()


@worker_ready.connect
def _clear_drain(**_: Any) -> None:
    # A drain mark is for the worker that was shutting down, never for a new one.
    store = _store()
    store.client.delete(store.keys.drain(liveness.process_name(vram_class)))


@worker_shutting_down.connect
def _drain(**_: Any) -> None:
    # In the parent: tell this worker's pool child to hand its job back at the next step.
    store = _store()
    store.client.set(store.keys.drain(liveness.process_name(vram_class)), "1", ex=3600)


@task_failure.connect
def _hard_time_limit(sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any) -> None:
    # A hard time limit kills the pool child, so the job cannot record its own end: the parent
    # does. (A soft limit ends the job from inside: see JobRunner.) Not redelivered: it would
    # only run out of time again.
    if task_id is None or type(exception).__name__ != "TimeLimitExceeded":
        return
    error = JobError(type=ErrorType.TIME_LIMIT, exception="TimeLimitExceeded", message=str(exception))
    try:
        _store().move(task_id, lifecycle.time_out(error, time.time()))
    except (Conflict, NotFound):
        pass


@worker_process_shutdown.connect
def _finish_pending(**_: Any) -> None:
    # In the pool child, as it exits (a warm shutdown, or the parent replacing it): the jobs the
    # finisher holds are stored and recorded first. A kill skips this: the reaper hands them back.
    if _runner is not None and not _runner.finisher.wait_idle(timeout_s=settings.max_run_s):
        log.warning("exiting with jobs still finishing; the reaper will hand them back")
    tracing.shutdown()  # the spans not yet exported go now


class FleetStats(bootsteps.StartStopStep):
    """Adds the pool child's resident models and GPU-busy share (from its heartbeat) to the
    worker's ``inspect stats``, which Flower shows on the worker's page."""

    def info(self, worker: Any) -> dict[str, object]:
        try:
            states = worker_states(_store().client, Keys(settings.key_prefix))
        except Exception:
            return {}
        children = {
            name: {k: state.get(k) for k in ("resident", "gpu_busy_s", "gpu_work_s", "gpu_busy_share")}
            for name, state in states.items()
            if liveness.of_this_start(name)
        }
        return {"fleet": children}


app.steps["worker"].add(FleetStats)


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self: Any, job_id: str) -> str:
    _outcomes.hostname = self.request.hostname or ""
    outcome = get_runner().run(job_id)
    log.info("job %s: %r", job_id, str(outcome))  # the words operators (and the suite) look for
    # The task's own end says nothing: what became of the job is told (TaskOutcomes) once its
    # record says so, which for a generated job is after the finisher has stored its outputs.
    raise Ignore()
