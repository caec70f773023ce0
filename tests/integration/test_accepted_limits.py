"""A job runs under the limits it was accepted under (Redis, a real worker process, real pipelines
on small weights): a worker whose FLEET_* limits are tighter than the API's still runs what the
API accepted. A job stored before jobs kept their limits falls back to the worker's."""

from __future__ import annotations

import pytest

from producer.client import Client
from routing.errors import ErrorType
from routing.jobs.record import JobStatus
from routing.limits import RequestLimits
from routing.settings import Settings

pytestmark = pytest.mark.integration

TWO_IMAGES = {
    "model": "z-image-turbo",
    "prompt": "a red fox in snow",
    "width": 64,
    "height": 64,
    "steps": 2,
    "seed": 7,
    "num_outputs": 2,
}


def test_a_worker_with_tighter_limits_runs_what_the_api_accepted(
    client: Client, start_worker, fleet_settings: Settings, redis_client
):
    assert client.limits == RequestLimits(max_num_outputs=4, max_loras=3)
    accepted = client.submit(TWO_IMAGES)
    # Stored as a job was before the limits travelled with it: no limits field.
    older = client.submit({**TWO_IMAGES, "seed": 8})
    assert client.get(accepted.id).limits == client.limits
    assert redis_client.hdel(client.keys.job(older.id), "limits") == 1
    assert client.get(older.id).limits is None

    start_worker(fleet_settings.model_copy(update={"max_num_outputs": 1}))

    record = accepted.wait(timeout_s=300)
    assert record.status is JobStatus.SUCCEEDED, record.error
    assert [o.seed for o in record.outputs] == [7, 8]

    old = older.wait(timeout_s=300)
    assert old.status is JobStatus.FAILED
    assert old.error.type is ErrorType.INVALID_REQUEST
    assert "num_outputs: must be at most 1 (got 2)" in old.error.message
