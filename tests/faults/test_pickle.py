"""A pickle message pushed onto a GPU queue (a compromised or misconfigured producer): refused,
never unpickled, nothing run from it; the queue keeps draining."""

from __future__ import annotations

import base64
import json
import pickle
from pathlib import Path

import pytest

from producer.client import Client
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.harness import event_types, small_request, wait_broker_idle, wait_warm

pytestmark = pytest.mark.integration


class _TouchOnUnpickle:
    """Unpickling this creates ``path``: proof that someone unpickled the message."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickle_message(client: Client, job_id: str, queue: str, marker: Path) -> str:
    """The job's own Celery message, its body pickled instead of JSON."""
    _, payload = client.store.messages.run_job(job_id, queue)
    envelope = json.loads(payload)
    body = pickle.dumps(((job_id, _TouchOnUnpickle(marker)), {}, {"callbacks": None, "errbacks": None}))
    envelope["body"] = base64.b64encode(body).decode()
    envelope["content-type"] = "application/x-python-serialize"
    envelope["content-encoding"] = "binary"
    return json.dumps(envelope)


def test_pickle_message_is_refused_and_the_queue_keeps_draining(
    client: Client, start_worker, fleet_settings, fault_redis, tmp_path
):
    redis = fault_redis.client()
    # A real job whose JSON message is swapped for a pickle one before any worker runs.
    target = client.submit(small_request("named by the pickle"))
    assert redis.rpop("gpu16") is not None
    marker = tmp_path / "unpickled"
    redis.lpush("gpu16", _pickle_message(client, target.id, "gpu16", marker))
    normal = client.submit(small_request("behind the pickle"))

    worker = start_worker()
    wait_warm(worker)

    assert normal.wait(timeout_s=120).status is JobStatus.SUCCEEDED
    # The job the pickle names, accepted and queued, lost its own message when the pickle took its
    # place: the fleet puts one back (worker.lost), and it runs from that.
    record = target.wait(timeout_s=60)
    wait_broker_idle(redis, timeout_s=30)  # every message taken and dealt with
    log = worker.log()
    assert "ContentDisallowed" in log and "application/x-python-serialize" in log, log[-3000:]
    assert not marker.exists()  # never unpickled, in the main process or the pool child
    # Nothing ran from it: the job ran once, from the message put back, the only one of its that
    # was received as a task.
    assert f"put back the messages of jobs {target.id}" in log
    assert log.count(f"run_job[{target.id}] received") == 1
    assert record.status is JobStatus.SUCCEEDED and record.attempt == 1
    assert event_types(client.store, target.id) == ["job.queued", "job.started", "job.succeeded"]
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{target.id}/") == [
        f"jobs/{target.id}/attempt-1/output-0.png"
    ]
    assert redis.hlen("unacked") == 0  # acknowledged and gone, not left to come back
    assert worker.proc.poll() is None
