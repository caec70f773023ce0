"""Flower for the fleet as a child process (the demo, the tests). What Flower shows, and why it
always runs behind basic auth: ``producer.flower``."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from localfleet.process import ServiceProcess
from routing.settings import Settings

# Loopback Flower must never be reached through a proxy the environment configured.
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def flower_command(port: int = 5555, address: str = "0.0.0.0", python: str | None = None) -> list[str]:
    """The command line that runs Flower for the fleet (with the fleet's settings and
    ``FLOWER_BASIC_AUTH`` in the environment). ``python``: the interpreter, ``sys.executable``
    when not given."""
    return [
        python or sys.executable,
        "-m",
        "celery",
        "-A",
        "producer.flower",
        "flower",
        f"--port={port}",
        f"--address={address}",
    ]


class FlowerProcess(ServiceProcess):
    """Flower for the fleet as a child process: ``celery -A producer.flower flower`` on
    ``address:port`` in its own process group, logging to ``log_path``, with ``settings`` in its
    environment (its broker is ``settings.redis_url``).

    Always behind basic auth (``user:password``, given to Flower as ``FLOWER_BASIC_AUTH``): its API
    can send tasks straight to the GPU queues, revoke jobs and shut workers down, bypassing the
    fleet API's tenants and checks, and without auth Flower would serve its pages to anyone who
    can reach the port. ``auth`` is the pair to send; ``/healthcheck`` needs none.
    """

    name = "flower"

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        port: int,
        password: str,
        user: str = "ops",
        address: str = "127.0.0.1",
        extra_env: dict[str, str] | None = None,
    ):
        if not password or ":" in user or "," in f"{user}{password}":
            # Flower splits FLOWER_BASIC_AUTH on commas (several users) and user from password
            # on the first colon.
            raise ValueError("need a password; no comma in user or password, no colon in user")
        self.url = f"http://{address}:{port}"
        self.auth = (user, password)
        env = {"FLOWER_BASIC_AUTH": f"{user}:{password}", **(extra_env or {})}
        super().__init__(flower_command(port, address)[1:], settings, log_path, env)

    def wait_ready(self, timeout_s: float = 60) -> FlowerProcess:
        """Until ``/healthcheck`` (outside basic auth) answers."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with _no_proxy.open(f"{self.url}/healthcheck", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"flower not ready after {timeout_s} s:\n{self.log()}")
