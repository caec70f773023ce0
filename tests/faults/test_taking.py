"""A worker killed as it takes a message (tests/faults/dies_on_take.py), at either instant of its
taking: after BRPOP took the message off its queue and before Kombu wrote it into its
unacknowledged set, and just after that write. Its job was never claimed: its record is queued,
and its message is nowhere (worker.lost) or only in Kombu's set (worker.held). The fleet gives it
back to a worker in seconds, with the default visibility timeout (600 s), and it runs once."""

from __future__ import annotations

import json
import re
import time

import pytest

from producer.client import Client
from routing.celery_config import UNACKED_KEY
from routing.io.storage import LocalStorage
from routing.jobs.record import JobStatus
from tests.faults.dies_on_take import MODULE
from tests.faults.harness import event_types, small_request, wait_broker_idle

pytestmark = pytest.mark.integration

# A worker start, two lost-message sweeps (a heartbeat TTL apart, 2 s here) and one small job,
# with the margin a loaded machine needs: nowhere near the visibility timeout (600 s), nor the
# queue's wait limit (6 h) that a message lost off its queue would otherwise end in.
RECOVERED_BOUND_S = 120


@pytest.mark.parametrize("where", ["before-unacked", "after-unacked"])
def test_a_job_whose_worker_was_killed_as_it_took_the_message_runs_once_soon(
    where: str, client: Client, start_worker, fault_redis, fleet_settings
):
    """Catches, before the write: a fleet with nothing that puts back a message lost off its queue
    (the job waits until it expires). After it: a holder's record written after Kombu's write
    instead of with it (the reaper knows nothing to give back: the job waits out the visibility
    timeout). Either: a put-back or give-back made twice (the job received twice)."""
    assert fleet_settings.visibility_timeout_s == 600
    redis = fault_redis.client()
    dying = start_worker(module=MODULE, FAULT_DIE_ON_TAKE=where)
    job = client.submit(small_request(f"taken by a worker killed {where}"))
    tag = json.loads(redis.hget(client.keys.job(job.id), "queued_message"))["properties"]["delivery_tag"]

    dying.proc.wait(timeout=60)
    killed_at = time.monotonic()
    assert f"fault: dying as it takes {job.id} ({where})" in dying.log()
    assert client.get(job.id).status is JobStatus.QUEUED
    assert redis.llen("gpu16") == 0  # taken off its queue
    assert redis.hexists(UNACKED_KEY, tag) == (where == "after-unacked")

    second = start_worker()
    record = job.wait(timeout_s=RECOVERED_BOUND_S)
    recovered_s = time.monotonic() - killed_at

    assert record.status is JobStatus.SUCCEEDED, record.error
    assert recovered_s < RECOVERED_BOUND_S, recovered_s
    # Run once: one claim, one output, and no copy of the message left to run it again.
    assert record.attempt == 1
    assert event_types(client.store, job.id) == ["job.queued", "job.started", "job.succeeded"]
    assert LocalStorage(fleet_settings.storage_dir).list(f"jobs/{job.id}/") == [
        f"jobs/{job.id}/attempt-1/output-0.png"
    ]
    wait_broker_idle(redis)
    assert second.log().count(f"run_job[{job.id}] received") == 1
    if where == "before-unacked":
        assert f"put back the messages of jobs {job.id}" in second.log()
    else:
        gave_back = rf"gave back the messages dead worker gpu16@[^:]+:{dying.proc.pid}:\w+ held: {tag}"
        assert re.search(gave_back, second.log())
