"""Start and stop a worker or the API as a child process: used by the demo, the benchmarks and the
tests.

Production runs ``python -m worker`` and uvicorn under their own supervisor (compose,
Kubernetes); this is for one host that wants a worker for a while and then wants it gone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, SecretStr

from localfleet import forkserver
from routing.settings import Settings

_ROOT = Path(__file__).resolve().parent.parent


def settings_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that gives a child process ``settings`` (FLEET_* variables)."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith("FLEET_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        value = _revealed(value)
        env[f"FLEET_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


def _revealed(value: Any) -> Any:
    """``value`` as plain JSON data, with secrets in the clear: the child needs them, and
    pydantic's JSON dump would mask them as stars."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return _revealed(value.model_dump())
    if isinstance(value, dict):
        return {k: _revealed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_revealed(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class ServiceProcess:
    """``python <args>`` in its own process group with the fleet's settings, logging to
    ``log_path``; ready once ``ready_text`` shows in the log."""

    ready_text = ""
    name = "service"

    def __init__(
        self,
        args: list[str],
        settings: Settings,
        log_path: Path,
        extra_env: dict[str, str] | None = None,
        warm: bool = False,
    ):
        """``warm``: forked from this process's fork server when one is enabled and can start it
        (``localfleet.forkserver``); else, and by default, a new ``python``."""
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        env = settings_env(settings) | (extra_env or {})
        server = forkserver.current() if warm else None
        self.proc: subprocess.Popen[bytes] | forkserver.ForkedProcess
        if server is not None and server.can_start(args, env, _ROOT):
            self.proc = server.start(args, env, _ROOT, log_path)
        else:
            self.proc = subprocess.Popen(
                [sys.executable, *args],
                cwd=_ROOT,
                env=env,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 120) -> Self:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if self.ready_text in self.log():
                return self
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the main process only."""
        self.proc.send_signal(signum)

    def stop(self, timeout_s: float = 30) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL to the whole group if it does not end in time."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class WorkerProcess(ServiceProcess):
    """``python -m <module>``: a GPU worker by default, ``worker.webhooks`` for deliveries."""

    ready_text = " ready."
    name = "worker"

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        extra_env: dict[str, str] | None = None,
        module: str = "worker",
        cold: bool = False,
    ):
        """``cold``: a new ``python`` even where a fork server is enabled (the production start)."""
        # Mingle and gossip talk to other workers at start; a lone worker only waits on them.
        super().__init__(
            ["-m", module, "--without-mingle", "--without-gossip"],
            settings,
            log_path,
            extra_env,
            warm=not cold,
        )


class ApiProcess(ServiceProcess):
    """The HTTP API under uvicorn on ``host:port``. Port 0 (the default): a port the kernel
    gives as uvicorn binds, so none can be taken between choosing and binding it; ``url`` names
    it once ``wait_ready`` returns. Forked from the fork server where one is enabled, as workers are."""

    ready_text = "Uvicorn running on"
    name = "api"

    def __init__(self, settings: Settings, log_path: Path, port: int = 0, host: str = "127.0.0.1"):
        super().__init__(
            ["-m", "uvicorn", "producer.api:app", "--host", host, "--port", str(port), "--no-access-log"],
            settings,
            log_path,
            warm=True,
        )
        self.url = f"http://{host}:{port}" if port else ""

    def wait_ready(self, timeout_s: float = 120) -> Self:
        super().wait_ready(timeout_s)
        # "Uvicorn running on http://127.0.0.1:43817 (Press CTRL+C to quit)": the bound port.
        self.url = re.search(r"Uvicorn running on (http://\S+)", self.log()).group(1)
        return self
