"""Warm starts for ``python -m worker`` and the API: a fork server that has imported torch,
diffusers, transformers, Celery, FastAPI and boto3 once, and forks a process from itself for
each start.

A worker started cold spends about four CPU seconds importing those libraries before its first
job (``import diffusers`` alone is most of it); a host that starts many short-lived workers, the
test suite above all, pays that each time. Forked from the server, the worker runs the same
``worker`` module's main, in its own session, logging to its own file, with its own
environment, and is a real Celery worker from there on: only the imports are already done.

Production does not use it: a worker there is one long-lived process per GPU, started by
``python -m worker`` under its supervisor. Nothing is enabled by default:
``localfleet.process.ServiceProcess`` starts through the server only once ``enable()`` has been
called in the process (the test suite does, per xdist worker), and only where the start is
``python -m <module>`` with an environment that the preloaded libraries would read the same
(``_READ_AT_IMPORT``): anything else, and any start asked to be cold, is a plain ``Popen``.

The server is ``python -m localfleet.forkserver``: it reads one JSON request a line on stdin
(module, argv, env, cwd, log and exit paths), answers the forked pid a line on stdout, reaps
its children and writes each one's exit status (``Popen.returncode``'s convention) to its exit
file, which ``ForkedProcess`` reads. It ends when its stdin closes; its children live on, in
their own sessions, as ``Popen(start_new_session=True)`` children would.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
# What the server imports before it forks: the libraries whose import a worker's first job pays.
# The fleet's own modules are not among them: ``worker.celery_app`` reads its settings on import,
# from the environment each start gives.
PRELOAD = (
    "torch",
    "transformers",
    "diffusers",
    "celery.apps.worker",
    "celery.bin.celery",  # the command line ``worker_main`` runs, with its plugins' commands
    "celery.concurrency.prefork",
    "kombu.transport.redis",
    "redis",
    "pydantic_settings",
    "PIL.Image",
    "av",  # the outputs' encoder
    "boto3",  # S3 storage, in workers and the API
    "fastapi",
    "uvicorn",  # ``python -m uvicorn producer.api:app``, the API (``localfleet.process.ApiProcess``)
)
# Environment variables the preloaded libraries read when they are imported: a start whose
# values differ from the server's would run with the server's, so it starts cold.
_READ_AT_IMPORT = (
    *("TORCH", "PYTORCH", "CUDA", "NCCL", "OMP_", "MKL_", "KMP_"),
    *("HF_", "HUGGINGFACE", "TRANSFORMERS", "DIFFUSERS", "PYTHON", "LD_"),
)

_enabled = False
_server: ForkServer | None = None
_server_lock = threading.Lock()


def enable() -> None:
    """Let this process's ``ServiceProcess`` starts go through a fork server, started on the
    first of them."""
    global _enabled
    _enabled = True


def current() -> ForkServer | None:
    """The process's fork server (started now if enabled and not yet running), or None."""
    global _server
    if not _enabled:
        return None
    with _server_lock:
        if _server is None:
            _server = ForkServer()
            atexit.register(_server.close)
        return _server


def _import_sensitive(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_READ_AT_IMPORT)}


class ForkServer:
    """The client side: starts the server and asks it for processes."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        self._exits = Path(tempfile.mkdtemp(prefix="fleet-forkserver-"))
        self._lock = threading.Lock()
        self._count = 0
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "localfleet.forkserver"],
            cwd=_ROOT,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def close(self) -> None:
        """End the server (its children live on) and remove its exit files."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        shutil.rmtree(self._exits, ignore_errors=True)

    def can_start(self, args: list[str], env: dict[str, str], cwd: Path) -> bool:
        return (
            len(args) >= 2
            and args[0] == "-m"
            and Path(cwd).resolve() == _ROOT
            and _import_sensitive(env) == _import_sensitive(self.env)
            and self._proc.poll() is None
        )

    def start(self, args: list[str], env: dict[str, str], cwd: Path, log_path: Path) -> ForkedProcess:
        """``python <args>`` (``-m module ...``), forked from the server."""
        with self._lock:
            self._count += 1
            exit_path = self._exits / f"{self._count}.exit"
            request = {
                "module": args[1],
                "argv": args[2:],
                "env": env,
                "cwd": str(cwd),
                "log": str(log_path),
                "exit": str(exit_path),
            }
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server ended")
        return ForkedProcess(int(json.loads(line)["pid"]), exit_path)


class ForkedProcess:
    """A process the server forked, as much of ``subprocess.Popen`` as the fleet's callers use:
    ``pid``, ``poll``, ``wait``, ``returncode``, ``send_signal``, ``terminate``, ``kill``."""

    def __init__(self, pid: int, exit_path: Path):
        self.pid = pid
        self.returncode: int | None = None
        self._exit_path = exit_path

    def poll(self) -> int | None:
        if self.returncode is None and self._exit_path.exists():
            self.returncode = int(self._exit_path.read_text())  # written whole, by a rename
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout or 0)
            time.sleep(0.02)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


# --- The server --------------------------------------------------------------------------------


def _status(status: int) -> int:
    """``os.waitpid``'s status as ``Popen.returncode``: the exit code, or minus the signal."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _child(request: dict) -> None:
    """In the forked child: become ``python -m <module> <argv>`` and never return."""
    code = 1
    try:
        os.setsid()
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(devnull)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = [request["module"], *request["argv"]]
        import runpy

        code = 0
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _reap(exits: dict[int, str]) -> None:
    while exits:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = exits.pop(pid, None)
        if path is not None:
            partial = f"{path}.partial"
            Path(partial).write_text(str(_status(status)))
            os.replace(partial, path)


def preload() -> None:
    """Import ``PRELOAD`` and the diffusers pipeline classes the catalog names (diffusers loads
    each pipeline's module, and the transformers classes it uses, on first use)."""
    import importlib
    import re

    for name in PRELOAD:
        importlib.import_module(name)
    import diffusers

    from routing.catalog import CATALOG

    for spec in CATALOG.values():
        for name in re.findall(r"diffusers\.(\w+)", spec.pipeline):
            getattr(diffusers, name, None)


def serve() -> None:
    preload()
    exits: dict[int, str] = {}
    stdin = sys.stdin.buffer
    while True:
        ready, _, _ = select.select([stdin], [], [], 0.02)
        _reap(exits)
        if not ready:
            continue
        line = stdin.readline()
        if not line:
            return
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        exits[pid] = request["exit"]
        sys.stdout.write(json.dumps({"pid": pid}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve()
