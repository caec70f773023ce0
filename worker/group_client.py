"""The consumer side of the resident group (``worker.group``): an Adapter for the h100x8 worker.

The h100x8 worker's pool child serves the models in ``settings.group_models`` through
``GroupAdapter``. The first one loaded starts the group: ``torchrun --standalone
--nproc_per_node=W -m worker.group`` in a process group of its own (so it can be killed whole),
which loads every group model on every rank and connects back to this process (127.0.0.1, with an
authentication key) once ready. Per job the adapter writes the inputs into a directory the ranks
read, sends (model, request, input paths), relays every step to ``on_step`` and answers
continue/stop, and reads the output rank 0 encoded.

When ``on_step`` raises ``JobCanceled`` the group is told to stop and the exception is re-raised
once every rank has stopped. When the group dies (a rank crashed, so torchrun exits non-zero; the
connection breaks; the job's deadline passes) the job fails with ``GroupFailed``, whose message
names the rank and its exit code, the group is killed whole, and the next job starts a fresh one.

A rank whose own code raises mid-job writes ``rank-N.error`` into the job's directory before it
joins the exchange of outcomes. If every rank raised alike, the exchange completes and the job
fails with their messages; if the others are still waiting for it inside the model's collectives
(an out-of-memory error on one GPU, say), nothing would end that wait but the collective timeout.
So once an error file appears the others get ``group_error_grace_s`` to finish the job, then the
group is killed and the job fails naming that rank's error.

Settings (``routing.settings``, else ``FLEET_*``): ``group_models``, ``group_world_size``,
``group_timeout_s`` (every collective; default 900), ``group_start_timeout_s`` (loading; default
1800), ``group_error_grace_s`` (default 30), ``group_log_dir`` (torchrun's output; default a
temporary directory), and ``max_run_s`` (a job's deadline).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import random
import re
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

from routing.catalog import ModelSpec, get_model
from routing.schemas import AUDIO_FIELDS, VIDEO_FIELDS
from worker.adapters.base import Generated, Inputs, JobCanceled, Runtime, StepCallback
from worker.group import AUTHKEY_ENV, RANK_ERROR_GLOB, SPEC_ENV, GroupSpec

log = logging.getLogger(__name__)

_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GROUP_MODELS = ["wan2.2-s2v-14b"]


class GroupFailed(RuntimeError):
    """The group could not run the job: it died, broke, or never became ready."""


class GroupJobError(RuntimeError):
    """The job failed on one or more ranks; the group itself is fine."""


def setting(name: str, default: Any) -> Any:
    """``settings.<name>``, else ``FLEET_<NAME>`` (JSON or text), else ``default``."""
    from routing.settings import get_settings

    settings = get_settings()
    if name in type(settings).model_fields:
        return getattr(settings, name)
    raw = os.environ.get(f"FLEET_{name.upper()}")
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def group_models() -> list[str]:
    return list(setting("group_models", DEFAULT_GROUP_MODELS))


class GroupAdapter:
    """Adapter for a model served by the group; every instance shares the process's one group."""

    def __init__(self, spec: ModelSpec, weights: str, runtime: Runtime):
        if os.environ.get(SPEC_ENV):
            raise RuntimeError("GroupAdapter inside a group rank: the group would start itself")
        self.spec = spec
        self.weights = weights
        self.runtime = runtime
        self.group = shared_group()
        if spec.key not in self.group.models:
            raise LookupError(f"{spec.key} is not one of the group's models ({', '.join(self.group.models)})")
        self.group.ensure_running()

    def run(self, request: Any, inputs: Inputs, on_step: StepCallback) -> Generated:
        return self.group.run(self.spec.key, request, inputs, on_step)

    def close(self) -> None:
        """Evicted from the worker's pool (a smaller class's model needs rank 0's GPU): end the
        group, which frees every rank's GPU; the next job of a group model starts a new one."""
        log.info("%s evicted: closing the group", self.spec.key)
        self.group.close()


_shared: Group | None = None
_shared_lock = threading.Lock()


def shared_group() -> Group:
    """The process's group, configured from the settings."""
    global _shared
    with _shared_lock:
        if _shared is None:
            from routing.settings import get_settings

            settings = get_settings()
            models = {key: settings.weights_for(key, get_model(key).hub_id) for key in group_models()}
            log_dir = setting("group_log_dir", None)
            _shared = Group(
                models=models,
                world_size=int(setting("group_world_size", 8)),
                device=settings.device,
                dtype=settings.dtype,
                timeout_s=float(setting("group_timeout_s", 900)),
                start_timeout_s=float(setting("group_start_timeout_s", 1800)),
                job_timeout_s=float(getattr(settings, "max_run_s", 7200)),
                error_grace_s=float(setting("group_error_grace_s", 30)),
                log_dir=Path(log_dir) if log_dir else None,
            )
            atexit.register(_shared.close)
        return _shared


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
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn: Connection | None = None
        self.pids: list[int] = []
        self.workdir: Path | None = None
        self.log_path: Path | None = None
        self.starts = 0
        self._in_job = False
        self._jobdir: Path | None = None  # the running job's directory: ranks' error files
        self._error_seen_at: float | None = None
        self._authkey_hex = ""
        self._lock = threading.Lock()

    # --- life cycle -------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.conn is not None

    def ensure_running(self) -> None:
        self._drain()
        if not self.alive:
            if self.proc is not None:
                self.kill()
            self.start()

    def start(self) -> None:
        self._check_gpus()
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
            if ready.get("type") != "ready":
                raise GroupFailed(f"unexpected first message from the group: {ready!r}")
            self.pids = list(ready["pids"])
        except BaseException:
            listener.close()
            self.kill()
            raise
        listener.close()
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
                self.conn.send({"type": "shutdown"})
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
            job_id = _job_id_of(on_step) or f"{int(time.time() * 1000)}-{random.randrange(16**6):06x}"
            jobdir = Path(tempfile.mkdtemp(prefix="job-", dir=self.workdir))
            self._in_job = False
            self._jobdir, self._error_seen_at = jobdir, None
            try:
                files = write_inputs(inputs, jobdir)
                self._send(
                    {
                        "type": "job",
                        "job_id": job_id,
                        "model": model,
                        "request": request.model_dump(mode="json"),
                        "inputs": files,
                        "workdir": str(jobdir),
                    },
                    job_id,
                )
                self._in_job = True
                return self._follow(job_id, on_step)
            except BaseException:
                if self._in_job:
                    # Stopped half-way through the protocol (KeyboardInterrupt, say): the group
                    # is mid-job and cannot take the next one.
                    self.kill()
                raise
            finally:
                self._in_job = False
                self._jobdir = None
                shutil.rmtree(jobdir, ignore_errors=True)

    def _follow(self, job_id: str, on_step: StepCallback) -> Generated:
        deadline = time.monotonic() + self.job_timeout_s
        while True:
            message = self._recv(deadline, what=f"job {job_id}")
            kind = message.get("type")
            if kind == "step":
                try:
                    on_step(message["step"], message["total"])
                except BaseException:
                    self._stop(job_id, deadline)
                    raise
                self._send({"type": "continue"}, job_id)
                continue
            self._in_job = False
            if kind == "result":
                return _generated(message)
            elif kind == "canceled":
                raise JobCanceled()
            elif kind == "error":
                raise GroupJobError(f"the group could not run job {job_id}: {message['message']}")
            elif kind == "group_broken":
                raise self._died(job_id, message.get("message", ""))
            else:
                raise self._died(job_id, f"unexpected message {message!r}")

    def _stop(self, job_id: str, deadline: float) -> None:
        """Tell rank 0 to stop and wait until every rank has (its answer comes after theirs)."""
        try:
            self._send({"type": "stop"}, job_id)
            confirm_by = min(deadline, time.monotonic() + max(30.0, self.timeout_s))
            while True:
                message = self._recv(confirm_by, what=f"job {job_id}'s stop")
                if message.get("type") in ("canceled", "result", "error"):
                    self._in_job = False
                    return
                if message.get("type") == "group_broken":
                    self.kill()
                    return
        except GroupFailed:
            log.warning("job %s: the group did not confirm the stop; it was killed", job_id)

    # --- plumbing ---------------------------------------------------------------------------

    def _send(self, message: dict[str, Any], job_id: str) -> None:
        try:
            assert self.conn is not None
            self.conn.send(message)
        except (OSError, AssertionError) as exc:
            raise self._died(f"job {job_id}", f"the connection to rank 0 broke ({exc})") from None

    def _recv(self, deadline: float, what: str) -> dict[str, Any]:
        """The group's next message; GroupFailed when it dies or ``deadline`` passes first."""
        assert self.conn is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._died(what, "its deadline passed", kill_first=True)
            try:
                if self.conn.poll(min(left, 0.5)):
                    return self.conn.recv()
            except (EOFError, OSError):
                raise self._died(what, "rank 0's connection closed") from None
            if self.proc is not None and self.proc.poll() is not None:
                raise self._died(what, "torchrun exited")
            self._check_rank_errors(what)

    def _rank_errors(self) -> str:
        """'rank 1: RuntimeError: ...' for each error file the running job's ranks wrote."""
        if self._jobdir is None:
            return ""
        found = []
        for path in sorted(self._jobdir.glob(RANK_ERROR_GLOB)):
            try:
                found.append(f"{path.stem.replace('-', ' ')}: {path.read_text(errors='replace').strip()}")
            except OSError:
                continue
        return "; ".join(found)

    def _check_rank_errors(self, what: str) -> None:
        """Kill the group once a rank's error has gone unanswered for ``error_grace_s``."""
        if self._jobdir is None:
            return
        if self._error_seen_at is None:
            if next(self._jobdir.glob(RANK_ERROR_GLOB), None) is not None:
                self._error_seen_at = time.monotonic()
            return
        if time.monotonic() - self._error_seen_at > self.error_grace_s:
            raise self._died(
                what,
                f"the other ranks had not finished {self.error_grace_s:g} s after it",
                kill_first=True,
            )

    def _died(self, what: str, reason: str, kill_first: bool = False) -> GroupFailed:
        """Kill the group, find out which rank failed first, and say so."""
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

    def _failure(self) -> str:
        code = self.proc.poll() if self.proc is not None else None
        text = self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
        cause = root_cause(text)
        if cause:
            return cause + (f"; torchrun exited with {code}" if code is not None else "")
        if code is None and self.proc is not None:
            return "torchrun is still running (it was killed)"
        tail = " | ".join(line.strip() for line in text.strip().splitlines()[-5:])
        if code is None:
            return f"torchrun is still running; last log lines: {tail}"
        return f"torchrun exited with {code}; last log lines: {tail}"


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


_ROOT_CAUSE = re.compile(
    r"Root Cause.*?rank\s*:\s*(?P<rank>\d+).*?exitcode\s*:\s*(?P<code>-?\d+)[^\n]*?(?:\((?P<signal>SIG\w+)\))?\s*$",
    re.S | re.M,
)


def root_cause(torchrun_output: str) -> str | None:
    """'rank 1 exited with -9 (SIGKILL)' from torchrun's failure summary, or None."""
    matches = list(_ROOT_CAUSE.finditer(torchrun_output))
    if not matches:
        return None
    found = matches[-1]  # the last summary is this group's latest failure
    signal_name = f" ({found['signal']})" if found["signal"] else ""
    return f"rank {found['rank']} exited with {found['code']}{signal_name}"


def _job_id_of(on_step: StepCallback) -> str | None:
    """The fleet's job id, so rank log lines name the job: ``on_step.job_id`` when set, else the
    ``job_id`` the runner's step callback closes over; None when neither is there."""
    explicit = getattr(on_step, "job_id", None)
    if isinstance(explicit, str):
        return explicit
    closure = getattr(on_step, "__closure__", None) or ()
    names = getattr(getattr(on_step, "__code__", None), "co_freevars", ())
    for name, cell in zip(names, closure, strict=False):
        if name == "job_id":
            try:
                value = cell.cell_contents
            except ValueError:
                return None
            return value if isinstance(value, str) else None
    return None


def write_inputs(inputs: Inputs, jobdir: Path) -> dict[str, Any]:
    """The runner's decoded inputs as files the ranks read: images as PNG, audio as given, videos
    re-encoded as MP4 at their frame rate (``<field>_fps`` alongside)."""
    from worker.media import encode_mp4, encode_png

    files: dict[str, Any] = {}
    for name, value in inputs.items():
        if name.endswith("_fps"):
            continue
        if isinstance(value, list) and name not in VIDEO_FIELDS:
            paths = []
            for index, image in enumerate(value):
                path = jobdir / f"{name}.{index}.png"
                path.write_bytes(encode_png(image))
                paths.append(str(path))
            files[name] = paths
        elif name in AUDIO_FIELDS:
            path = jobdir / f"{name}.{_audio_extension(value)}"
            path.write_bytes(value)
            files[name] = str(path)
        elif name in VIDEO_FIELDS:
            fps = float(inputs.get(f"{name}_fps") or 16.0)
            path = jobdir / f"{name}.mp4"
            path.write_bytes(encode_mp4(value, max(1, round(fps)), crf=12, preset="veryfast"))
            files[name], files[f"{name}_fps"] = str(path), fps
        else:
            path = jobdir / f"{name}.png"
            path.write_bytes(encode_png(value))
            files[name] = str(path)
    return files


def _audio_extension(data: bytes) -> str:
    if data[:4] == b"RIFF":
        return "wav"
    if data[:4] == b"fLaC":
        return "flac"
    return "mp3"


def _generated(message: dict[str, Any]) -> Generated:
    from worker.media import decode_image

    if message.get("kind") == "images":
        images = [decode_image(Path(p).read_bytes()) for p in message["paths"]]
        return Generated(
            images=images,
            seed=message.get("seed"),
            seeds=message.get("seeds") or [],
            cache=message.get("cache"),
        )
    return Generated(
        encoded=Path(message["path"]).read_bytes(),
        width=message["width"],
        height=message["height"],
        frame_count=message["frame_count"],
        fps=message["fps"],
        seed=message.get("seed"),
        cache=message.get("cache"),
    )
