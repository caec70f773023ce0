"""The resident torchrun group through a real h100x8 worker, on the CPU: two ranks over gloo.

The group serves the small Wan2.2-S2V checkpoint with the official code (``wan.WanS2V``, FSDP and
Ulysses over the two ranks, as on eight GPUs) and, beside it, the small Z-Image-Turbo run by both
ranks with the same seed (the path for a model with no group model of its own). Rank 0 encodes
the video with the speech in it and the worker stores it.

Each rank logs ``rank N got job <id>`` into the group's log (``FLEET_GROUP_LOG_DIR``), one log
file per group started, which is how these tests see what every rank did.
"""

from __future__ import annotations

import io
import os
import re
import signal
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from routing.settings import Settings
from testkit.s2v import GROUP_MODEL as S2V_GROUP_MODEL
from tests import parallel
from worker.media import encode_png, encode_wav

# heavy: two CPU ranks take both cores while they compute (tests/parallel.py).
pytestmark = [pytest.mark.integration, *parallel.CPU_GROUP_MARKS]

S2V = "wan2.2-s2v-14b"
SPEECH_S = 1.5
FAST_IMAGE = {"model": "z-image-turbo", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2}


def _wav(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return encode_wav(np.sin(2 * np.pi * 180 * t) * np.sin(2 * np.pi * 3 * t) * 0.37, rate)


def _png(size: tuple[int, int]) -> bytes:
    return encode_png(Image.new("RGB", size, (200, 150, 120)))


def _s2v(client: Client, seconds: float, steps: int) -> dict:
    """A speech-to-video request: one 80-frame clip for every 5 s of speech (or part of it)."""
    return {
        "model": S2V,
        "prompt": "a person talks to the camera",
        "image": client.upload(_png((96, 64))),
        "audio": client.upload(_wav(seconds)),
        "width": 832,
        "height": 480,
        "steps": steps,
    }


@pytest.fixture
def group_logs(tmp_path: Path) -> Path:
    return tmp_path / "group-logs"


@pytest.fixture
def group_worker(start_worker, fleet_settings: Settings, group_logs: Path):
    """An h100x8 worker whose group (2 ranks, CPU, gloo) serves S2V and z-image-turbo."""
    settings = fleet_settings.model_copy(
        update={
            "worker_class": "h100x8",
            "group_models": [S2V, "z-image-turbo"],
            "group_world_size": 2,
            # z-image-turbo's own adapter is the single-GPU one; here the group serves it too.
            "adapters": {"z-image-turbo": "worker.group.adapter:GroupAdapter"},
            # S2V's ranks run the small checkpoint on the CPU.
            "group_adapters": {S2V: S2V_GROUP_MODEL},
        }
    )
    return start_worker(
        settings,
        # The group reads them from the worker's settings, which read these variables.
        FLEET_GROUP_MODELS=f'["{S2V}", "z-image-turbo"]',
        FLEET_GROUP_WORLD_SIZE="2",
        FLEET_GROUP_TIMEOUT_S="60",
        FLEET_GROUP_START_TIMEOUT_S="180",
        FLEET_GROUP_LOG_DIR=str(group_logs),
    )


@pytest.fixture
def faulty_group_worker(start_worker, fleet_settings: Settings, group_logs: Path):
    """An h100x8 worker whose group (2 ranks) runs Z-Image through tests.faults.adapters, which
    fails one rank when the prompt asks (``fault:raise-on-rank=1``, ``fault:stall-on-rank=0``)."""
    settings = fleet_settings.model_copy(
        update={
            "worker_class": "h100x8",
            "group_models": ["z-image-turbo"],
            "group_world_size": 2,
            "group_timeout_s": 60,
            "group_error_grace_s": 3,
            "group_log_dir": group_logs,
            "adapters": {"z-image-turbo": "worker.group.adapter:GroupAdapter"},
            "group_adapters": {"z-image-turbo": "tests.faults.adapters:FaultAdapter"},
        }
    )
    return start_worker(settings)


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
        record = client.get(job_id)
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


def _wait_gone(pids: list[int], timeout_s: float, what: str) -> None:
    """Until no process of ``pids`` runs (a zombie counts as gone)."""
    _wait_for(lambda: not any(_alive(p) for p in pids), timeout_s, f"{what} {pids} still running")


def _audio_seconds(mp4: bytes) -> float:
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.audio[0]
        return sum(f.samples for f in container.decode(stream)) / stream.codec_context.sample_rate


# One worker's groups from start to stop, in one test: a group start is two CPU ranks importing
# torch, diffusers and the official code and loading both models (about 20 CPU-seconds), so the
# group each step leaves behind is the next step's.
@pytest.mark.timeout(900)
def test_a_groups_life_every_rank_runs_each_job_a_cancel_stops_them_together_an_eviction_or_a_killed_rank_ends_it(
    client: Client, group_worker, group_logs: Path, fleet_settings: Settings
):
    storage = LocalStorage(fleet_settings.storage_dir)

    # Every rank runs the job; rank 0 stores the video, with the speech in it.
    job = client.submit(_s2v(client, SPEECH_S, steps=2))
    record = job.wait(timeout_s=300)

    assert record.status is JobStatus.SUCCEEDED, record.error
    # Rank 0 answers once both ranks' outcomes are gathered; rank 1 writes its own line about then,
    # and on a loaded machine may write it after the job has been stored.
    lines = [
        f"rank {rank} {what}"
        for rank in (0, 1)
        for what in (f"got job {job.id} ({S2V})", f"finished job {job.id}: ok")
    ]
    _wait_for(lambda: all(line in _logs(group_logs)[0] for line in lines), 30, "both ranks' lines")
    [log] = _logs(group_logs)
    [output] = record.outputs
    assert output.content_type == "video/mp4"
    # One 80-frame clip less the 3 the first clip drops, at 16 fps; the small checkpoint renders
    # 832*480 within its 128*64 cap.
    assert (output.width, output.height, output.frames, output.fps) == (128, 64, 77, 16)
    assert output.seed is not None  # drawn once, used by both ranks
    # What the group ran it with (its speed profile: nothing on until measured, and the CPU has
    # no TF32): named in the job's timings as every model's techniques are.
    assert (record.timings["tf32"], record.timings["attention_native"]) == (0, 1)
    assert storage.list(f"jobs/{job.id}/") == [output.key]
    mp4 = storage.get(output.key)
    # The speech is muxed whole (AAC adds a frame or two of encoder delay).
    assert _audio_seconds(mp4) == pytest.approx(SPEECH_S, abs=0.1)
    pids = _rank_pids(log)

    # A cancel stops every rank at the same step. 12 s of speech: three clips of 40 steps, tens of
    # seconds on two CPU ranks.
    job = client.submit(_s2v(client, 12.0, steps=40))
    _wait_for_step(client, job.id, 2)

    client.cancel(job.id)
    record = job.wait(timeout_s=120)

    assert record.status is JobStatus.CANCELED
    assert record.outputs == [] and record.step < 3 * 40
    assert storage.list(f"jobs/{job.id}/") == []
    [log] = _logs(group_logs)
    stopped = {
        rank: int(step) for rank, step in re.findall(rf"rank (\d) stopped job {job.id} at step (\d+)", log)
    }
    assert set(stopped) == {"0", "1"}, log[-3000:]
    assert len(set(stopped.values())) == 1  # both at the same step

    # The same group (no second log, same processes) runs the next job, of its other model: two
    # images, each with its own seed reported by the group, encoded by the consumer as asked.
    after = client.submit({**FAST_IMAGE, "num_outputs": 2, "seed": 9, "output_format": "webp"})
    after_record = after.wait(timeout_s=180)
    assert after_record.status is JobStatus.SUCCEEDED, after_record.error
    assert [(o.width, o.height) for o in after_record.outputs] == [(64, 64), (64, 64)]
    assert [o.seed for o in after_record.outputs] == [9, 10]
    assert [o.content_type for o in after_record.outputs] == ["image/webp", "image/webp"]
    assert [o.key for o in after_record.outputs] == [
        f"jobs/{after.id}/attempt-1/output-{i}.webp" for i in range(2)
    ]
    assert after_record.worker.startswith("h100x8@")
    [log] = _logs(group_logs)
    assert f"rank 1 got job {after.id} (z-image-turbo)" in log
    assert _rank_pids(log) == pids and all(_alive(p) for p in pids)

    # A gpu80 job the idle h100x8 worker takes: Qwen-Image at 512x512, predicted at 54.9 GiB
    # (53.7 of it weights), does not fit beside the group's weights on rank 0 (S2V's rank share,
    # 11.0 GiB predicted, and the whole Z-Image-Turbo every rank holds, 19.1 GiB) in its 78 GiB
    # budget (80 GB less the margin), so the group is closed first.
    spilled = client.submit(
        {"model": "qwen-image", "prompt": "a lighthouse", "width": 512, "height": 512, "steps": 2}
    )
    spilled_record = spilled.wait(timeout_s=180)
    assert spilled_record.status is JobStatus.SUCCEEDED, spilled_record.error
    assert spilled_record.worker.startswith("h100x8@")
    _wait_gone(pids, 60, "group ranks")

    # S2V again: a new group starts.
    again = client.submit(_s2v(client, SPEECH_S, steps=2))
    assert again.wait(timeout_s=300).status is JobStatus.SUCCEEDED
    first_log, second_log = _logs(group_logs)
    assert f"rank 1 got job {again.id}" in second_log

    # A rank killed mid-job fails that job, as the group's fault, and the next job gets a new group.
    job = client.submit(_s2v(client, 12.0, steps=40))
    _wait_for_step(client, job.id, 2)
    rank0, rank1 = _rank_pids(_logs(group_logs)[1])

    os.kill(rank1, signal.SIGKILL)
    record = job.wait(timeout_s=150)

    assert record.status is JobStatus.FAILED
    message = record.error.message
    assert "rank 1" in message and "SIGKILL" in message, message
    assert record.error.type == "group_error", record.error  # the group died, not the model
    _wait_gone([rank0], 60, "rank 0 of the dead group")

    after = client.submit(_s2v(client, SPEECH_S, steps=2))
    after_record = after.wait(timeout_s=300)
    assert after_record.status is JobStatus.SUCCEEDED, after_record.error
    *_, third_log = _logs(group_logs)
    assert len(_logs(group_logs)) == 3 and f"rank 1 got job {after.id}" in third_log
    pids = _rank_pids(third_log)
    assert set(pids).isdisjoint({rank0, rank1})

    # Stopping the worker takes the group with it: rank 0 sees its connection close.
    group_worker.stop()
    _wait_gone(pids, 60, "group ranks")


def test_a_ranks_own_error_fails_the_job_naming_it_and_one_while_the_others_wait_ends_after_the_grace(
    client: Client, faulty_group_worker, group_logs: Path
):
    job = client.submit({**FAST_IMAGE, "prompt": "a red fox fault:raise-on-rank=1"})
    record = job.wait(timeout_s=120)

    assert record.status is JobStatus.FAILED
    assert "rank 1: RuntimeError: fault injected on rank 1" in record.error.message, record.error

    after = client.submit(FAST_IMAGE)
    after_record = after.wait(timeout_s=180)
    assert after_record.status is JobStatus.SUCCEEDED, after_record.error

    # Rank 1 fails and waits for rank 0 in the exchange of outcomes; rank 0 is stuck outside any
    # collective. Only the 60 s collective timeout would end that wait; the 3 s grace ends it.
    job = client.submit({**FAST_IMAGE, "prompt": "a red fox fault:raise-on-rank=1 fault:stall-on-rank=0"})
    record = job.wait(timeout_s=120)

    assert record.status is JobStatus.FAILED
    message = record.error.message
    assert "rank 1: RuntimeError: fault injected on rank 1" in message, message
    assert "the other ranks had not finished 3 s after it; it was killed" in message, message
    rank0, rank1 = _rank_pids(_logs(group_logs)[-1])
    _wait_gone([rank0, rank1], 30, "the stalled group")

    after = client.submit(FAST_IMAGE)
    assert after.wait(timeout_s=180).status is JobStatus.SUCCEEDED
