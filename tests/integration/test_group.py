"""The resident torchrun group through a real h100x8 worker, on the CPU: two ranks over gloo.

The official S2V code needs CUDA (see ``worker.adapters.s2v.CPU_BLOCKERS``), so here the group
serves the small Z-Image-Turbo, run by both ranks with the same seed; rank 0 encodes and the
worker stores. The GPU check of S2V itself is ``bench/gpu_s2v.py``.

Each rank logs ``rank N got job <id>`` into the group's log (``FLEET_GROUP_LOG_DIR``), one log
file per group started, which is how these tests see what every rank did.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from producer.client import Client
from routing.jobs import JobStatus
from routing.settings import Settings
from routing.storage import LocalStorage

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FAST = {"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2}
# Seconds of work on two CPU ranks, so the test can act while it runs.
SLOW = {"model": "z-image-turbo", "prompt": "a slow one", "width": 512, "height": 512, "steps": 50}


@pytest.fixture
def group_logs(tmp_path: Path) -> Path:
    return tmp_path / "group-logs"


@pytest.fixture
def group_worker(start_worker, fleet_settings: Settings, group_logs: Path):
    """An h100x8 worker whose group (2 ranks, CPU, gloo) serves z-image-turbo."""
    settings = fleet_settings.model_copy(
        update={
            "worker_class": "h100x8",
            "group_models": ["z-image-turbo"],
            "group_world_size": 2,
            # z-image-turbo's own adapter is the single-GPU one; here the group serves it.
            "adapters": {"z-image-turbo": "worker.group_client:GroupAdapter"},
        }
    )
    return start_worker(
        settings,
        # The Settings fields exist; the variables are named too for a worker whose settings
        # lack them (worker.group_client falls back to the environment).
        FLEET_GROUP_MODELS='["z-image-turbo"]',
        FLEET_GROUP_WORLD_SIZE="2",
        FLEET_GROUP_TIMEOUT_S="60",
        FLEET_GROUP_START_TIMEOUT_S="180",
        FLEET_GROUP_LOG_DIR=str(group_logs),
    )


def _logs(group_logs: Path) -> list[str]:
    """Each group's log, oldest first."""
    files = sorted(group_logs.glob("group-*.log"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    return [f.read_text(errors="replace") for f in files]


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout_s} s")


def _wait_for_step(client: Client, job_id: str, step: int, timeout_s: float = 180) -> None:
    def reached() -> bool:
        record = client.status(job_id)
        return record.step >= step or record.status.is_terminal()

    _wait_for(reached, timeout_s, f"job {job_id} did not reach step {step}")


def _rank_pids(log: str) -> list[int]:
    found = re.search(r"group ready: \d+ ranks, pids \[([\d, ]+)\]", log)
    assert found, log[-3000:]
    return [int(p) for p in found.group(1).split(",")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers; it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def test_every_rank_runs_the_job_and_rank_0_stores_one_output(
    client: Client, group_worker, group_logs: Path, fleet_settings: Settings
):
    job = client.submit(FAST)
    record = job.wait(timeout_s=240)

    assert record.status is JobStatus.SUCCEEDED, record.error
    [log] = _logs(group_logs)
    for rank in (0, 1):
        assert f"rank {rank} got job {job.id} (z-image-turbo)" in log
        assert f"rank {rank} finished job {job.id}: ok" in log
    assert len(record.outputs) == 1
    assert (record.outputs[0].width, record.outputs[0].height) == (64, 64)
    assert record.outputs[0].seed is not None  # drawn once, used by both ranks
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == [record.outputs[0].key]

    # Stopping the worker takes the group with it: rank 0 sees its connection close.
    pids = _rank_pids(log)
    group_worker.stop()
    _wait_for(lambda: not any(_alive(p) for p in pids), 60, f"group ranks {pids} still running")


def test_cancel_stops_every_rank_at_the_same_step_and_the_group_serves_on(
    client: Client, group_worker, group_logs: Path, fleet_settings: Settings
):
    job = client.submit(SLOW)
    _wait_for_step(client, job.id, 2)

    client.cancel(job.id)
    record = job.wait(timeout_s=120)

    assert record.status is JobStatus.CANCELED
    assert record.outputs == [] and record.step < SLOW["steps"]
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == []
    [log] = _logs(group_logs)
    stopped = {
        rank: int(step) for rank, step in re.findall(rf"rank (\d) stopped job {job.id} at step (\d+)", log)
    }
    assert set(stopped) == {"0", "1"}, log[-3000:]
    assert len(set(stopped.values())) == 1  # both at the same step

    # The same group (no second log, same processes) runs the next job.
    pids = _rank_pids(log)
    after = client.submit(FAST)
    assert after.wait(timeout_s=120).status is JobStatus.SUCCEEDED
    [log] = _logs(group_logs)
    assert f"rank 1 got job {after.id}" in log
    assert all(_alive(p) for p in pids)


def test_a_rank_killed_mid_job_fails_that_job_and_the_next_gets_a_new_group(
    client: Client, group_worker, group_logs: Path
):
    job = client.submit(SLOW)
    _wait_for_step(client, job.id, 2)
    [log] = _logs(group_logs)
    rank0, rank1 = _rank_pids(log)

    os.kill(rank1, signal.SIGKILL)
    record = job.wait(timeout_s=150)

    assert record.status is JobStatus.FAILED
    message = record.error["message"]
    assert "rank 1" in message and "SIGKILL" in message, message
    _wait_for(lambda: not _alive(rank0), 60, "rank 0 of the dead group still running")

    after = client.submit(FAST)
    after_record = after.wait(timeout_s=240)
    assert after_record.status is JobStatus.SUCCEEDED, after_record.error
    first, second = _logs(group_logs)
    assert f"rank 1 got job {after.id}" in second
    assert set(_rank_pids(second)).isdisjoint({rank0, rank1})
