"""localfleet.forkserver: a process forked from the server is ``python -m <module>`` with the
environment, log, exit status and signals a ``Popen`` child would have; a start whose
environment the preloaded libraries read differently is a plain ``Popen``."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from localfleet.forkserver import ForkedProcess, ForkServer
from localfleet.process import ServiceProcess
from routing.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PROBE = ["-m", "tests.forked_probe"]


@pytest.fixture(scope="module")
def server():
    started = ForkServer()
    yield started
    started.close()


def test_a_forked_module_gets_its_argv_environment_and_log_and_its_exit_code_is_read(server, tmp_path):
    log = tmp_path / "probe.log"
    env = server.env | {"PROBE": "given"}
    proc = server.start([*PROBE, "3"], env, ROOT, log)

    assert isinstance(proc, ForkedProcess)
    assert proc.wait(timeout=30) == 3 and proc.poll() == 3
    # The server imported torch before it forked: the module ran with it already there.
    assert log.read_text() == "argv=['3'] probe=given torch=True\n"
    assert os.getpgid(os.getpid()) != proc.pid  # its own session and process group


def test_a_signal_ends_it_as_popen_reports_a_signal_and_wait_times_out_as_popen(server, tmp_path):
    proc = server.start([*PROBE, "0", "60"], server.env, ROOT, tmp_path / "probe.log")
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_a_start_whose_environment_the_preloaded_libraries_read_differently_is_cold(tmp_path, monkeypatch):
    from localfleet import forkserver

    monkeypatch.setattr(forkserver, "_enabled", True)
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    warm = ServiceProcess([*PROBE, "0"], settings, tmp_path / "warm.log", {"PROBE": "w"}, warm=True)
    cold = ServiceProcess(
        [*PROBE, "0"], settings, tmp_path / "cold.log", {"PROBE": "c", "OMP_NUM_THREADS": "7"}, warm=True
    )
    try:
        assert isinstance(warm.proc, ForkedProcess) and warm.proc.wait(timeout=30) == 0
        assert isinstance(cold.proc, subprocess.Popen) and cold.proc.wait(timeout=30) == 0
        assert warm.log() == "argv=['0'] probe=w torch=True\n"
        assert cold.log() == "argv=['0'] probe=c torch=False\n"
    finally:
        warm.stop()
        cold.stop()
