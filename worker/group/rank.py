"""One rank of the resident group: one process per GPU under torchrun, the models loaded once.

    torchrun --standalone --nproc_per_node=W -m worker.group      (started by the supervisor)

Upstream runs Wan2.2-S2V or A14B as ``torchrun --nproc_per_node=8 generate.py ...`` per job,
loading 27B of weights each time. Here every rank loads its group models once (``GROUP_MODELS``: a
model with a group model of its own, S2V and T2V/I2V-A14B sharded with FSDP + Ulysses; any other
model key runs its ordinary adapter on every rank with the same seed) and then serves jobs:

* rank 0 holds the one connection to the supervisor (``worker.group.supervisor``, in the Celery
  pool child): it receives a job and broadcasts it to every rank, and every rank runs it;
* after each denoising step rank 0 tells the supervisor and learns whether to go on (cancel),
  then broadcasts a stop flag, so every rank stops at the same step;
* every rank reports how its part ended (``all_gather_object``); rank 0 encodes the output (MP4
  with the input speech muxed in, or PNG) into the job's directory and answers with its path.

No wait is unbounded: collectives have the process group's ``timeout``; while idle, rank 0
broadcasts a heartbeat every ``heartbeat_s`` so the other ranks' wait for the next job never
reaches it; rank 0 waits for the supervisor's answer to a step at most ``reply_timeout_s``; and
rank 0 exits when the supervisor's connection closes or its process is gone. A rank that finds
the group broken (a peer died: the collective fails) exits non-zero, and torchrun then ends
every rank.
"""

from __future__ import annotations

import datetime
import importlib
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from worker.group import files, protocol
from worker.group.rank_errors import write_error
from worker.group.spec import AUTHKEY_ENV, GroupPlace, GroupSpec

# Models with a group model of their own; any other key runs its single-GPU adapter on every rank.
GROUP_MODELS: dict[str, str] = {
    "wan2.2-s2v-14b": "worker.adapters.s2v:S2VGroupModel",
    "wan2.2-t2v-a14b": "worker.adapters.a14b:A14BGroupModel",
    "wan2.2-i2v-a14b": "worker.adapters.a14b:A14BGroupModel",
}

log = logging.getLogger("worker.group")


class GroupBroken(Exception):
    """A collective failed: a peer is gone, or the group timed out. The group cannot go on."""


class ConsumerGone(Exception):
    """Rank 0 lost the supervisor: the group has no one to serve."""


@dataclass
class JobState:
    """How one rank's part of a job ended."""

    outcome: str = "ok"  # ok | canceled | error
    step: int = 0
    message: str = ""
    generated: Any = None
    video_crf: int = 18  # what rank 0 encodes a video at


class Rank:
    def __init__(self, spec: GroupSpec):
        import torch
        import torch.distributed as dist

        from worker.adapters.base import Runtime

        self.spec = spec
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))
        runtime = Runtime.resolve(spec.device, spec.dtype)
        self.cuda = runtime.device.startswith("cuda")
        if self.cuda:
            torch.cuda.set_device(self.local_rank)
            runtime = Runtime(device=f"cuda:{self.local_rank}", dtype=runtime.dtype)
        self.runtime = runtime
        self.comm_device = torch.device(f"cuda:{self.local_rank}") if self.cuda else torch.device("cpu")
        kwargs: dict[str, Any] = {"device_id": self.comm_device} if self.cuda else {}
        dist.init_process_group(
            backend="nccl" if self.cuda else "gloo",
            timeout=datetime.timedelta(seconds=spec.timeout_s),
            **kwargs,
        )
        self.dist = dist
        self.parent_pid = os.getppid()  # torchrun
        self.conn: Connection | None = None
        self.models: dict[str, Any] = {}

    # --- start -----------------------------------------------------------------------------

    def load(self) -> None:
        from routing.catalog import get_model

        place = GroupPlace(self.rank, self.world_size, self.local_rank)
        for key, weights in self.spec.models.items():
            started = time.perf_counter()
            self.models[key] = _load_group_model(get_model(key), weights, self.runtime, place)
            log.info("loaded %s from %s in %.1f s", key, weights, time.perf_counter() - started)
        pids = [None] * self.world_size
        self.dist.all_gather_object(pids, os.getpid())
        self.pids = pids
        if self.rank == 0:
            self.conn = Client(self.spec.address, authkey=bytes.fromhex(os.environ[AUTHKEY_ENV]))
            self.conn.send(
                protocol.encode(
                    protocol.Ready(world_size=self.world_size, pids=pids, models=list(self.models))
                )
            )
        log.info("group ready: %d ranks, pids %s", self.world_size, pids)

    # --- serve -----------------------------------------------------------------------------

    def serve(self) -> int:
        while True:
            message = self._next_message()
            if isinstance(message, protocol.Idle):
                continue
            if isinstance(message, protocol.Shutdown):
                log.info("shutting down")
                return 0
            if isinstance(message, protocol.Job):
                self._run_job(message)
            else:
                log.warning("unexpected message %r", message)

    def _next_message(self) -> protocol.Message:
        """Rank 0: the supervisor's next message, or a heartbeat; broadcast to every rank."""
        message: protocol.Message | None = None
        if self.rank == 0:
            assert self.conn is not None
            message = self._recv(self.spec.heartbeat_s) or protocol.Idle()
            if isinstance(message, protocol.Idle):
                self._check_consumer()
        box = [message]
        self._collective(self.dist.broadcast_object_list, box, src=0)
        return box[0]

    def _run_job(self, job: protocol.Job) -> None:
        job_id, model = job.job_id, job.model
        log.info("rank %d got job %s (%s)", self.rank, job_id, model)
        state = JobState(video_crf=job.request.get("video_crf", 18))
        workdir = Path(job.workdir)
        try:
            request = _parse(job.request)
            group_model = self.models[model]

            def on_step(step: int, total: int) -> None:
                state.step = step
                self._step(job_id, step, total)

            if isinstance(group_model, ReplicatedModel):
                output_pixels = (request.width or 0) * (request.height or 0) or None
                inputs = files.read_inputs(job.inputs, job_id=job_id, max_video_pixels=output_pixels)
                state.generated = group_model.run(request, inputs, on_step)
            else:
                paths = files.upright_images(job.inputs, workdir, self.rank)
                state.generated = group_model.run(request, paths, on_step, workdir)
        except GroupBroken:
            raise
        except _job_canceled():
            state.outcome = "canceled"
            log.info("rank %d stopped job %s at step %d", self.rank, job_id, state.step)
        except Exception as exc:  # a failure of this job, unless the group itself broke
            if _is_collective_failure(exc):
                raise GroupBroken(f"rank {self.rank}: {exc}") from exc
            state.outcome, state.message = "error", f"{type(exc).__name__}: {exc}"
            log.error("rank %d: job %s failed:\n%s", self.rank, job_id, traceback.format_exc())
            # The other ranks may be waiting for this one inside the model's own collectives and
            # never reach the exchange below: the supervisor reads this file, gives them
            # group_error_grace_s, and kills the group naming this error.
            write_error(workdir, self.rank, state.message)

        outcomes: list[Any] = [None] * self.world_size
        self._collective(self.dist.all_gather_object, outcomes, (state.outcome, state.step, state.message))
        if self.cuda:
            import torch

            peak = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            log.info(
                "rank %d finished job %s: %s (peak GPU memory %.2f GiB)",
                self.rank,
                job_id,
                state.outcome,
                peak,
            )
        else:
            log.info("rank %d finished job %s: %s", self.rank, job_id, state.outcome)
        if self.rank == 0:
            self._answer(job_id, outcomes, state, workdir)

    def _step(self, job_id: str, step: int, total: int) -> None:
        """Every rank, after each step: rank 0 asks the supervisor, then all learn whether to stop."""
        import torch

        stop = 0
        if self.rank == 0:
            assert self.conn is not None
            self._send(protocol.Step(job_id=job_id, step=step, total=total))
            reply = self._recv(self.spec.reply_timeout_s)
            if reply is None:
                raise GroupBroken(f"no answer from the supervisor for {self.spec.reply_timeout_s} s")
            stop = int(isinstance(reply, protocol.Stop))
        flag = torch.tensor([stop], dtype=torch.int32, device=self.comm_device)
        self._collective(self.dist.broadcast, flag, src=0)
        if int(flag.item()):
            from worker.adapters.base import JobCanceled

            raise JobCanceled()

    def _answer(self, job_id: str, outcomes: list[Any], state: JobState, workdir: Path) -> None:
        errors = [
            f"rank {r}: {message}" for r, (outcome, _s, message) in enumerate(outcomes) if outcome == "error"
        ]
        if errors:
            self._send(protocol.JobFailed(job_id=job_id, message="; ".join(errors)))
        elif any(outcome == "canceled" for outcome, _s, _m in outcomes):
            steps = sorted({s for outcome, s, _m in outcomes})
            self._send(protocol.Canceled(job_id=job_id, steps=steps))
        else:
            try:
                result = files.write_output(state.generated, job_id, workdir, crf=state.video_crf)
            except Exception as exc:
                log.exception("job %s: encoding failed", job_id)
                self._send(protocol.JobFailed(job_id=job_id, message=f"rank 0 encoding: {exc}"))
                return
            self._send(result)

    # --- plumbing ----------------------------------------------------------------------------

    def _collective(self, function: Any, *args: Any, **kwargs: Any) -> None:
        try:
            function(*args, **kwargs)
        except Exception as exc:
            raise GroupBroken(f"rank {self.rank}: {type(exc).__name__}: {exc}") from exc

    def _send(self, message: protocol.Message) -> None:
        assert self.conn is not None
        try:
            self.conn.send(protocol.encode(message))
        except OSError as exc:
            raise GroupBroken(f"the supervisor's connection broke: {exc}") from exc

    def _recv(self, timeout_s: float) -> protocol.Message | None:
        assert self.conn is not None
        try:
            if not self.conn.poll(timeout_s):
                return None
            data = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise ConsumerGone(f"the supervisor's connection closed ({type(exc).__name__})") from exc
        try:
            return protocol.decode(data)
        except protocol.ProtocolError as exc:
            log.warning("ignoring a message from the supervisor: %s", exc)
            return protocol.Idle()

    def _check_consumer(self) -> None:
        if os.getppid() != self.parent_pid:
            raise ConsumerGone(f"torchrun (pid {self.parent_pid}) is gone")
        pid = self.spec.consumer_pid
        if pid is None:
            return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise ConsumerGone(f"the supervisor (pid {pid}) is gone") from None
        except PermissionError:
            pass


def _parse(data: dict[str, Any]) -> Any:
    """The request the supervisor parsed and filled in (seed included), as its schema's object."""
    from routing.catalog import TaskKind
    from routing.schemas import REQUEST_TYPES

    return REQUEST_TYPES[TaskKind(data["kind"])].model_validate(data)


def _job_canceled() -> type[BaseException]:
    from worker.adapters.base import JobCanceled

    return JobCanceled


def _is_collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    dist_errors = tuple(
        e for e in (getattr(dist, "DistError", None), getattr(dist, "DistBackendError", None)) if e
    )
    if dist_errors and isinstance(exc, dist_errors):
        return True
    text = str(exc)
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL", "gloo"))


def _load_group_model(spec: Any, weights: str, runtime: Any, place: GroupPlace) -> Any:
    target = GROUP_MODELS.get(spec.key)
    if target is not None:
        from routing.settings import get_settings

        # settings.group_adapters may name a group model of one's own (a subclass) instead.
        target = get_settings().group_adapters.get(spec.key) or target
        module_name, class_name = target.split(":")
        return getattr(importlib.import_module(module_name), class_name)(spec, weights, runtime, place)
    return ReplicatedModel(spec, weights, runtime, place)


class ReplicatedModel:
    """A single-GPU adapter run by every rank with the same request (seed included): the ranks
    step in lockstep so a cancel stops them together; rank 0's output is the job's."""

    def __init__(self, spec: Any, weights: str, runtime: Any, place: GroupPlace):
        from routing.settings import get_settings
        from worker import adapters

        # settings.group_adapters, then settings.adapters over the built-in ones as the worker
        # loads them, except the one that sends the model to the group (this is the group).
        settings = get_settings()
        candidates = [
            settings.group_adapters.get(spec.key),
            settings.adapters.get(spec.key),
            adapters.ADAPTERS.get(spec.key),
        ]
        target = next((t for t in candidates if t and t != adapters.GROUP_ADAPTER), None)
        if target is None:
            raise LookupError(f"no single-GPU adapter runs {spec.key} inside the group")
        adapters._quiet_loading()
        module_name, class_name = target.split(":")
        self.adapter = getattr(importlib.import_module(module_name), class_name)(spec, weights, runtime)
        self.place = place

    def run(self, request: Any, inputs: Any, on_step: Any) -> Any:
        generated = self.adapter.run(request, inputs, on_step)
        return generated if self.place.rank == 0 else None


def _configure_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s group rank {rank} pid %(process)d %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> int:
    rank_number = int(os.environ.get("RANK", "0"))
    _configure_logging(rank_number)
    spec = GroupSpec.from_env()
    rank: Rank | None = None
    try:
        rank = Rank(spec)
        log.info(
            "rank %d of %d (local %d) on %s, backend %s",
            rank.rank,
            rank.world_size,
            rank.local_rank,
            rank.runtime.device,
            "nccl" if rank.cuda else "gloo",
        )
        rank.load()
        code = rank.serve()
    except ConsumerGone as exc:
        log.error("rank %d: %s; exiting", rank_number, exc)
        return 3
    except GroupBroken as exc:
        log.error("rank %d: the group is broken: %s", rank_number, exc)
        if rank is not None and rank.conn is not None:
            try:  # best effort: the supervisor then waits for torchrun's account of the failure
                rank.conn.send(protocol.encode(protocol.Broken(message=str(exc))))
            except OSError:
                pass
        # Leave the first failure to be the one torchrun reports (the rank that died): it ends
        # this process itself within moments; exit anyway if it does not.
        time.sleep(min(10.0, spec.timeout_s))
        return 2
    if rank is not None:
        try:
            rank.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    return code
