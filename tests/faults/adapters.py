"""Fault-injection adapters: the real small ``ZImagePipeline`` (outputs are real PNGs), plus the
GPU failure modes a CPU test machine cannot produce by itself. Used only by tests, which load
them in the worker through ``settings.adapters``::

    settings.adapters = {"z-image-turbo": "tests.faults.adapters:FaultAdapter"}

Which fault a job meets is written in its prompt, so one worker runs faulty and normal jobs side
by side (a prompt without directives is a normal job)::

    fault:sleep=0.3       sleep this long after every step: a slow job (time limits, kills mid-job)
    fault:kill-at=2       SIGKILL this process (the worker's pool child) once step 2 is reported,
                          on every attempt: a job that kills its worker every time
    fault:oom-on=gpu16    raise torch.cuda.OutOfMemoryError at the first step on a worker of this
                          class (comma list; the class is the worker's FLEET_WORKER_CLASS), after
                          that step's sleep: a cancel asked meanwhile is not seen before it
    fault:hold=30         before the first step, block this long, swallowing the soft time limit
                          (SoftTimeLimitExceeded): only the hard time limit ends the job
    fault:raise-on-rank=1 in a group rank (worker.group, ``RANK``) of this number: raise
                          RuntimeError once step 1 is reported (an error of that rank alone)
    fault:stall-on-rank=0 in a group rank of this number: block for ten minutes once step 1 is
                          reported, outside any collective (a hung kernel)
    fault:await-cancel=60 before the out of memory or the kill asked for above, or the hand-back
                          a draining worker's step asks for, wait (at most this long) until the
                          job's cancel has been asked, after logging "fault adapter: awaiting the
                          cancel of <job id>": a test asks for the cancel when it reads that line,
                          so the cancel lands in that very gap, never seen at a step

The same faults can be given to every job a worker runs through its environment:
``FAULT_STEP_SLEEP_S``, ``FAULT_KILL_AT_STEP``, ``FAULT_OOM_CLASSES``, ``FAULT_HOLD_S``. A
directive in the prompt wins over the environment.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

from routing.schemas import TextToImageRequest
from worker.adapters.base import Generated, Inputs, StepCallback
from worker.adapters.z_image import ZImageAdapter
from worker.runner import HandBack

log = logging.getLogger(__name__)

_DIRECTIVE = re.compile(r"\bfault:([a-z-]+)=(\S+)")
_ENV = {
    "sleep": "FAULT_STEP_SLEEP_S",
    "kill-at": "FAULT_KILL_AT_STEP",
    "oom-on": "FAULT_OOM_CLASSES",
    "hold": "FAULT_HOLD_S",
    "raise-on-rank": "FAULT_RAISE_ON_RANK",
    "stall-on-rank": "FAULT_STALL_ON_RANK",
    "await-cancel": "FAULT_AWAIT_CANCEL_S",
}


@dataclass(frozen=True)
class Faults:
    sleep_s: float = 0.0
    kill_at_step: int | None = None
    oom_on: frozenset[str] = frozenset()
    hold_s: float = 0.0
    raise_on_rank: int | None = None
    stall_on_rank: int | None = None
    await_cancel_s: float = 0.0

    @classmethod
    def of(cls, prompt: str, env: Mapping[str, str]) -> Faults:
        values = {name: env[var] for name, var in _ENV.items() if env.get(var)}
        values.update(dict(_DIRECTIVE.findall(prompt)))
        unknown = set(values) - set(_ENV)
        if unknown:
            raise ValueError(f"unknown fault directives {sorted(unknown)}")
        return cls(
            sleep_s=float(values.get("sleep", 0)),
            kill_at_step=int(values["kill-at"]) if "kill-at" in values else None,
            oom_on=frozenset(c for c in values.get("oom-on", "").split(",") if c),
            hold_s=float(values.get("hold", 0)),
            raise_on_rank=int(values["raise-on-rank"]) if "raise-on-rank" in values else None,
            stall_on_rank=int(values["stall-on-rank"]) if "stall-on-rank" in values else None,
            await_cancel_s=float(values.get("await-cancel", 0)),
        )


def out_of_memory() -> BaseException:
    import torch

    # The message CUDA's caching allocator gives; the type is torch's own (torch.OutOfMemoryError).
    return torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 15.56 GiB "
        "of which 1.19 GiB is free. (injected by tests.faults.adapters)"
    )


def hold_through_soft_limit(seconds: float) -> None:
    """Block for ``seconds``, swallowing every SoftTimeLimitExceeded (a pipeline stuck in code
    that ignores it): only the pool's hard time limit, which kills the process, ends this."""
    from celery.exceptions import SoftTimeLimitExceeded

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimitExceeded:
            log.warning("fault adapter: soft time limit swallowed")


def await_cancel(job_id: str | None, seconds: float) -> None:
    """Block until the job's cancel has been asked (its record's mark), at most ``seconds``."""
    from routing.io.connection import connect
    from routing.jobs.keys import Keys
    from routing.settings import get_settings

    settings = get_settings()
    client = connect(settings)
    log.warning("fault adapter: awaiting the cancel of %s", job_id)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if client.hget(Keys(settings.key_prefix).job(job_id or ""), "cancel_requested") == b"1":
            return
        time.sleep(0.02)
    log.warning("fault adapter: no cancel of %s within %s s", job_id, seconds)


class FaultAdapter(ZImageAdapter):
    """Z-Image-Turbo on its real pipeline, with the faults its prompt (or the worker's
    environment) asks for."""

    def run(self, request: TextToImageRequest, inputs: Inputs, on_step: StepCallback) -> Generated:
        faults = Faults.of(request.prompt, os.environ)
        worker_class = os.environ.get("FLEET_WORKER_CLASS", "gpu16")
        rank = int(os.environ["RANK"]) if "RANK" in os.environ else None
        if faults.hold_s:
            hold_through_soft_limit(faults.hold_s)

        def step(done: int, total: int) -> None:
            try:
                on_step(done, total)  # progress first: cancel and drain are seen as usual
            except HandBack:
                if faults.await_cancel_s:
                    await_cancel(inputs.job_id, faults.await_cancel_s)
                raise
            if done == 1 and worker_class in faults.oom_on:
                time.sleep(faults.sleep_s)
                if faults.await_cancel_s:
                    await_cancel(inputs.job_id, faults.await_cancel_s)
                raise out_of_memory()
            if done == 1 and rank is not None and rank == faults.raise_on_rank:
                raise RuntimeError(f"fault injected on rank {rank}")
            if done == 1 and rank is not None and rank == faults.stall_on_rank:
                log.warning("fault adapter: rank %s stalls", rank)
                time.sleep(600)
            if faults.kill_at_step is not None and done >= faults.kill_at_step:
                if faults.await_cancel_s:
                    await_cancel(inputs.job_id, faults.await_cancel_s)
                log.warning("fault adapter: killing pool process %s at step %s", os.getpid(), done)
                os.kill(os.getpid(), signal.SIGKILL)
            if faults.sleep_s:
                time.sleep(faults.sleep_s)

        return super().run(request, inputs, step)
