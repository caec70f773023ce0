"""The supervisor of the resident group, in the h100x8 worker's Celery pool child.

``Group.start`` runs ``torchrun --standalone --nproc_per_node=W -m worker.group`` in a process
group of its own (so it can be killed whole); every rank loads every group model and rank 0
connects back (127.0.0.1, with an authentication key) once ready. Per job ``Group.run`` writes
the inputs into a directory the ranks read, sends the job, relays every step to ``on_step`` and
answers continue/stop, and reads the output rank 0 encoded.

When ``on_step`` raises ``JobCanceled`` the group is told to stop and the exception is re-raised
once every rank has stopped. When the group dies (a rank crashed, so torchrun exits non-zero; the
connection breaks; the job's deadline passes) the job fails with ``GroupFailed``, whose message
names the rank and its exit code, the group is killed whole, and the next job starts a fresh one.
A rank's own error mid-job is watched for as ``rank_errors`` describes.

The group's life is one ``GroupState``; every change of it goes through ``Group._become``.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any

from routing.errors import ErrorType
from worker.adapters.base import Generated, Inputs, JobCanceled, StepCallback
from worker.group import files, protocol
from worker.group.rank_errors import RankErrorWatcher
from worker.group.spec import AUTHKEY_ENV, SPEC_ENV, GroupSpec
from worker.group.torchrun_log import describe_failure

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parent.parent.parent


class GroupFailed(RuntimeError):
    """The group could not run the job: it died, broke, or never became ready."""

    error_type = ErrorType.GROUP_ERROR  # what the runner records (a model error is the default)


class GroupJobError(RuntimeError):
    """The job failed on one or more ranks; the group itself is fine."""


class GroupState(enum.Enum):
    CLOSED = "closed"  # no torchrun: not started yet, or killed
    STARTING = "starting"  # torchrun runs; the ranks load
    READY = "ready"  # waiting for a job
    RUNNING = "running"  # a job was sent and rank 0 has not answered it
    BROKEN = "broken"  # it failed; about to be killed

    def can_become(self, other: GroupState) -> bool:
        return other in _TRANSITIONS[self]


# Killing the group (CLOSED) is allowed from every state, so cleaning up never fails.
_TRANSITIONS: dict[GroupState, frozenset[GroupState]] = {
    GroupState.CLOSED: frozenset({GroupState.STARTING, GroupState.CLOSED}),
    GroupState.STARTING: frozenset({GroupState.READY, GroupState.BROKEN, GroupState.CLOSED}),
    GroupState.READY: frozenset({GroupState.RUNNING, GroupState.BROKEN, GroupState.CLOSED}),
    GroupState.RUNNING: frozenset({GroupState.READY, GroupState.BROKEN, GroupState.CLOSED}),
    GroupState.BROKEN: frozenset({GroupState.BROKEN, GroupState.CLOSED}),
}


class IllegalTransition(RuntimeError):
    """The supervisor tried to move the group to a state its current one does not lead to."""


class Group:
    """One torchrun group at a time: started on demand, killed whole when it fails."""

    def __init__(
        self,
        models: dict[str, str],
        world_size: int,
        device: str = "auto",
        dtype: str = "auto",
        timeout_s: float = 900.0,
        start_timeout_s: float = 1800.0,
        job_timeout_s: float = 7200.0,
        error_grace_s: float = 30.0,
        log_dir: Path | None = None,
    ):
        self.models = dict(models)
        self.world_size = world_size
        self.device = device
        self.dtype = dtype
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.job_timeout_s = job_timeout_s
        self.error_grace_s = error_grace_s
        self.log_dir = log_dir or Path(tempfile.gettempdir()) / "fleet-group-logs"
        self.state = GroupState.CLOSED
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.pids: list[int] = []
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.starts = 0
        self._errors: RankErrorWatcher | None = None  # the running job's ranks' error files
        self._authkey_hex = ""
        self._lock = threading.Lock()

    def _become(self, state: GroupState) -> None:
        """The one place the group's state changes: a change its state does not allow is a bug."""
        if not self.state.can_become(state):
            raise IllegalTransition(f"the group cannot go from {self.state.value} to {state.value}")
        self.state = state

    # --- life cycle -------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return (
            self.state in (GroupState.READY, GroupState.RUNNING)
            and self.proc is not None
            and self.proc.poll() is None
        )

    def ensure_running(self) -> None:
        self._drain()
        if not self.alive:
            if self.proc is not None:
                self.kill()
            self.start()

    def start(self) -> None:
        self._check_gpus()
        self._become(GroupState.STARTING)
        self.starts += 1
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"group-{os.getpid()}-{self.starts}.log"
        self.workdir = Path(tempfile.mkdtemp(prefix="fleet-group-"))
        authkey = os.urandom(32)
        self._authkey_hex = authkey.hex()
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        spec = GroupSpec(
            address=listener.address,
            models=self.models,
            device=self.device,
            dtype=self.dtype,
            timeout_s=self.timeout_s,
            heartbeat_s=max(0.5, min(10.0, self.timeout_s / 6)),
            reply_timeout_s=max(1.0, self.timeout_s / 2),
            consumer_pid=os.getpid(),
        )
        env = dict(os.environ)
        env.update({SPEC_ENV: spec.to_json(), AUTHKEY_ENV: authkey.hex(), "PYTHONUNBUFFERED": "1"})
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc_per_node={self.world_size}",
            "--max_restarts=0",
            "--monitor_interval=0.5",
            "-m",
            "worker.group",
        ]
        log.info(
            "starting the group: %d ranks, models %s; log %s",
            self.world_size,
            list(self.models),
            self.log_path,
        )
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                command, cwd=_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        accepted: list[Any] = []

        def accept() -> None:
            try:
                accepted.append(listener.accept())
            except Exception as exc:  # noqa: BLE001 - closed listener or failed handshake
                accepted.append(exc)

        thread = threading.Thread(target=accept, name="group-accept", daemon=True)
        thread.start()
        started = time.monotonic()
        deadline = started + self.start_timeout_s
        try:
            while thread.is_alive():
                thread.join(0.2)
                if self.proc.poll() is not None and thread.is_alive():
                    raise GroupFailed(f"the group exited while loading: {self._failure()}")
                if time.monotonic() > deadline:
                    raise GroupFailed(f"the group was not ready after {self.start_timeout_s:.0f} s")
            result = accepted[0]
            if isinstance(result, BaseException):
                raise GroupFailed(f"the group's connection failed: {result}")
            self.conn = result
            ready = self._recv(deadline, what="the group's ready message")
            if not isinstance(ready, protocol.Ready):
                raise GroupFailed(f"unexpected first message from the group: {ready!r}")
            self.pids = list(ready.pids)
        except BaseException:
            listener.close()
            self.kill()
            raise
        listener.close()
        self._become(GroupState.READY)
        log.info(
            "group ready in %.1f s: ranks' pids %s (log %s)",
            time.monotonic() - started,
            self.pids,
            self.log_path,
        )

    def _drain(self) -> None:
        """Between jobs rank 0 says nothing: anything readable is its connection closing."""
        if self.conn is None:
            return
        try:
            while self.conn.poll(0):
                message = self.conn.recv()
                log.warning("group said %r between jobs", message)
        except (EOFError, OSError):
            log.warning("the group's connection closed between jobs; it will be restarted")
            self.kill()

    def kill(self) -> None:
        """End the group whole (torchrun and every rank) and forget it."""
        self._become(GroupState.CLOSED)
        if self.conn is not None:
            try:
                self.conn.close()
            except OSError:
                pass
            self.conn = None
        # torchrun starts every rank in a session of its own, so killing torchrun's process group
        # leaves the ranks running: each is ended by its own process group, once it is sure to
        # be this group's rank (its environment holds this group's key; pids get reused).
        for pid in self.pids:
            if _is_our_rank(pid, self._authkey_hex):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log.error("torchrun (pid %d) did not end after SIGKILL", self.proc.pid)
        self.pids = []
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _check_gpus(self) -> None:
        """One GPU per rank: a machine with fewer is refused before torchrun starts ranks that
        would fail one by one."""
        import torch

        if self.device.startswith("cpu") or (self.device == "auto" and not torch.cuda.is_available()):
            return
        found = torch.cuda.device_count()
        if found < self.world_size:
            raise GroupFailed(
                f"the group has {self.world_size} ranks (FLEET_GROUP_WORLD_SIZE), one per GPU, and this "
                f"machine has {found} GPU{'s' if found != 1 else ''}"
            )

    def close(self) -> None:
        """Ask the group to exit, then make sure it has."""
        if self.alive:
            try:
                assert self.conn is not None
                self.conn.send(protocol.encode(protocol.Shutdown()))
                assert self.proc is not None
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    # --- jobs -------------------------------------------------------------------------------

    def run(self, model: str, request: Any, inputs: Inputs, on_step: StepCallback) -> Generated:
        with self._lock:
            self.ensure_running()
            assert self.workdir is not None and self.conn is not None
            # Every rank draws the same noise: the seed is fixed here when the caller gave none.
            if request.seed is None:
                request = request.model_copy(update={"seed": random.randrange(2**63)})
            job_id = getattr(inputs, "job_id", None) or _local_job_id()
            jobdir = Path(tempfile.mkdtemp(prefix="job-", dir=self.workdir))
            self._errors = RankErrorWatcher(jobdir, self.error_grace_s)
            try:
                job = protocol.Job(
                    job_id=job_id,
                    model=model,
                    request=request.model_dump(mode="json"),
                    inputs=files.write_inputs(inputs, jobdir),
                    workdir=str(jobdir),
                )
                self._send(job, job_id)
                self._become(GroupState.RUNNING)
                return self._follow(job_id, on_step)
            except BaseException:
                if self.state is GroupState.RUNNING:
                    # Stopped half-way through the protocol (KeyboardInterrupt, say): the group
                    # is mid-job and cannot take the next one.
                    self.kill()
                raise
            finally:
                self._errors = None
                shutil.rmtree(jobdir, ignore_errors=True)

    def _follow(self, job_id: str, on_step: StepCallback) -> Generated:
        deadline = time.monotonic() + self.job_timeout_s
        while True:
            message = self._recv(deadline, what=f"job {job_id}")
            if isinstance(message, protocol.Step):
                try:
                    on_step(message.step, message.total)
                except BaseException:
                    self._stop(job_id, deadline)
                    raise
                self._send(protocol.Continue(), job_id)
                continue
            if isinstance(message, protocol.Broken):
                raise self._died(job_id, message.message)
            if not isinstance(message, protocol.JOB_ENDS):
                raise self._died(job_id, f"unexpected message {message!r}")
            self._become(GroupState.READY)
            if isinstance(message, protocol.Canceled):
                raise JobCanceled()
            if isinstance(message, protocol.JobFailed):
                raise GroupJobError(f"the group could not run job {job_id}: {message.message}")
            return files.read_output(message)

    def _stop(self, job_id: str, deadline: float) -> None:
        """Tell rank 0 to stop and wait until every rank has (its answer comes after theirs)."""
        try:
            self._send(protocol.Stop(), job_id)
            confirm_by = min(deadline, time.monotonic() + max(30.0, self.timeout_s))
            while True:
                message = self._recv(confirm_by, what=f"job {job_id}'s stop")
                if isinstance(message, protocol.JOB_ENDS):
                    self._become(GroupState.READY)
                    return
                if isinstance(message, protocol.Broken):
                    self.kill()
                    return
        except GroupFailed:
            log.warning("job %s: the group did not confirm the stop; it was killed", job_id)

    # --- plumbing ---------------------------------------------------------------------------

    def _send(self, message: protocol.Message, job_id: str) -> None:
        try:
            assert self.conn is not None
            self.conn.send(protocol.encode(message))
        except (OSError, AssertionError) as exc:
            raise self._died(f"job {job_id}", f"the connection to rank 0 broke ({exc})") from None

    def _recv(self, deadline: float, what: str) -> protocol.Message:
        """The group's next message; GroupFailed when it dies or ``deadline`` passes first."""
        assert self.conn is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._died(what, "its deadline passed", kill_first=True)
            try:
                if self.conn.poll(min(left, 0.5)):
                    data = self.conn.recv()
                    try:
                        return protocol.decode(data)
                    except protocol.ProtocolError as exc:
                        raise self._died(what, f"unexpected message: {exc}", kill_first=True) from None
            except (EOFError, OSError):
                raise self._died(what, "rank 0's connection closed") from None
            if self.proc is not None and self.proc.poll() is not None:
                raise self._died(what, "torchrun exited")
            if self._errors is not None and self._errors.overdue():
                raise self._died(
                    what,
                    f"the other ranks had not finished {self.error_grace_s:g} s after it",
                    kill_first=True,
                )

    def _died(self, what: str, reason: str, kill_first: bool = False) -> GroupFailed:
        """Kill the group, find out which rank failed first, and say so."""
        self._become(GroupState.BROKEN)
        if kill_first:
            raised = self._rank_errors()  # read before kill() removes the job's directory
            self.kill()
            return GroupFailed(f"the GPU group gave up on {what}: {_joined(raised, reason)}; it was killed")
        # torchrun ends the other ranks and prints the root cause when one fails: let it finish.
        if self.proc is not None:
            try:
                self.proc.wait(timeout=max(45.0, min(self.timeout_s, 120.0)))
            except subprocess.TimeoutExpired:
                pass
        raised = self._rank_errors()  # after the wait: a rank may have written it while winding down
        detail = self._failure()
        self.kill()
        return GroupFailed(f"the GPU group failed during {what}: {_joined(raised, detail)} ({reason})")

    def _rank_errors(self) -> str:
        return self._errors.read() if self._errors is not None else ""

    def _failure(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        return describe_failure(self.log_path, code, started=self.proc is not None)


def _local_job_id() -> str:
    """A job id for the ranks' log lines when the caller ran no fleet job (a benchmark)."""
    return f"{int(time.time() * 1000)}-{random.randrange(16**6):06x}"


def _joined(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _is_our_rank(pid: int, authkey_hex: str) -> bool:
    """True if process ``pid`` is alive and was started with this group's key."""
    if not authkey_hex:
        return False
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{AUTHKEY_ENV}={authkey_hex}".encode() in environ.split(b"\0")
