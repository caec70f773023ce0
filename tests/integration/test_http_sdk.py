"""The HTTP SDK (sync and async) against a real uvicorn process, real Redis, a real GPU worker and
outputs in a real S3-protocol store; and the live events and Prefer: wait behind it."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from localfleet.process import ApiProcess
from producer.http import (
    AsyncClient,
    Client,
    Conflict,
    InvalidRequest,
    NotFound,
    TooManyJobs,
    Unauthorized,
)
from routing.io.storage import make_storage
from routing.jobs.keys import Keys
from routing.settings import Settings
from tests.dropped import DropFirstResponse
from tests.integration.test_api import SMALL, settings  # noqa: F401  (the S3 + tenants settings fixture)

pytestmark = pytest.mark.integration

LONG = SMALL | {"width": 64, "height": 64, "steps": 40}


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture
def api_url(settings: Settings, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as process:
        yield process.url


def test_sync_client_submits_follows_waits_uploads_and_downloads(api_url, settings, start_worker, tmp_path):  # noqa: F811
    start_worker(settings)
    with Client(api_url, "key-a") as fleet:
        upload = fleet.upload(png())
        assert upload["key"].startswith("uploads/")
        with pytest.raises(InvalidRequest) as refused:
            fleet.upload(b"not an image")
        assert refused.value.fields == ["file"]
        with pytest.raises(InvalidRequest) as refused:
            fleet.submit(SMALL | {"width": 65})
        assert refused.value.fields == ["width"]

        job = fleet.submit({k: v for k, v in SMALL.items() if k != "kind"})  # kind from the catalog
        seen = []
        record = fleet.wait(
            job.id, timeout_s=180, on_progress=lambda r: seen.append((r.status.value, r.step))
        )
        assert record.status.value == "succeeded", record.error
        assert ("running", 2) in seen or ("running", 1) in seen
        [path] = fleet.download(job.id, tmp_path / "out")
        assert Image.open(path).size == (64, 80)
        assert [o.key for o in fleet.result(job.id)] == [f"jobs/{job.id}/attempt-1/output-0.png"]
        jobs, _cursor = fleet.list()
        assert job.id in [j.id for j in jobs]
        # Deleted now: every file of its runs, then its record.
        fleet.delete(job.id)
        assert make_storage(settings).list(f"jobs/{job.id}/") == []
        with pytest.raises(NotFound):
            fleet.get(job.id)

    with pytest.raises(Unauthorized), Client(api_url, "wrong") as stranger:
        stranger.get(job.id)


def test_async_client_submits_waits_downloads_and_cancels(api_url, settings, start_worker, tmp_path):  # noqa: F811
    start_worker(settings)

    async def scenario() -> None:
        async with AsyncClient(api_url, "key-a") as fleet:
            key = (await fleet.upload(png()))["key"]
            assert key.startswith("uploads/")
            job = await fleet.submit(SMALL)
            record = await fleet.wait(job.id, timeout_s=180)
            assert record.status.value == "succeeded", record.error
            [path] = await fleet.download(job.id, tmp_path / "async")
            assert Image.open(path).size == (64, 80)

            long = await fleet.submit(LONG)
            canceled = await fleet.cancel(long.id)
            assert canceled.status.value in ("canceled", "queued", "running")
            final = await fleet.wait(long.id, timeout_s=120)
            assert final.status.value == "canceled"
            jobs, _ = await fleet.list(limit=5)
            assert {job.id, long.id} <= {j.id for j in jobs}

    asyncio.run(scenario())


def test_a_429_is_retried_after_its_retry_after(api_url, settings):  # noqa: F811
    # Tenant b may have one unfinished job; no worker runs, so its first job stays queued.
    with Client(api_url, "key-b", max_retries=0) as impatient:
        first = impatient.submit(SMALL)
        with pytest.raises(TooManyJobs):
            impatient.submit(SMALL | {"seed": 1})

    # The API says Retry-After: 10. The job is canceled after 1 s; the retry comes after 10 s.
    threading.Timer(1.0, lambda: Client(api_url, "key-b").cancel(first.id)).start()
    with Client(api_url, "key-b") as patient:
        started = time.monotonic()
        second = patient.submit(SMALL | {"seed": 1})
        elapsed_s = time.monotonic() - started
    assert second.status.value == "queued" and second.created
    assert 9.5 <= elapsed_s < 20


def test_a_submit_retried_after_a_dropped_connection_makes_one_job(api_url, settings, redis_client):  # noqa: F811
    transport = DropFirstResponse(lambda r: r.method == "POST" and r.url.path == "/v1/jobs")
    with Client(api_url, "key-a", transport=transport) as fleet:
        job = fleet.submit(SMALL)
        jobs, _ = fleet.list()
    assert transport.dropped == 1
    assert not job.created  # the retry found the job the lost answer was about
    assert [j.id for j in jobs] == [job.id]
    assert redis_client.zcard(Keys(settings.key_prefix).tenant_jobs("a")) == 1


def test_only_an_ended_job_is_deleted_and_a_delete_whose_answer_was_lost_is_done(api_url, settings):  # noqa: F811
    purge = DropFirstResponse(lambda r: r.method == "DELETE" and r.url.params.get("purge") == "true")
    with (
        Client(api_url, "key-a") as fleet,
        Client(api_url, "key-a", transport=purge) as dropping,
        Client(api_url, "key-b") as b,
    ):
        job = fleet.submit(SMALL)  # no worker: it waits
        with pytest.raises(Conflict):  # not ended: cancel it first
            fleet.delete(job.id)
        assert fleet.get(job.id).status.value == "queued"
        assert fleet.cancel(job.id).status.value == "canceled"
        with pytest.raises(NotFound):  # another tenant's job is as unknown as none
            b.delete(job.id)
        # The first answer is lost; the retry finds the job gone, which is what was asked.
        dropping.delete(job.id)
        assert purge.dropped == 1
        with pytest.raises(NotFound):
            fleet.get(job.id)
        fleet.delete(job.id)  # asked again: deleted already, answered alike (FLEET_DELETED_JOB_TTL_S)
        with pytest.raises(NotFound):  # to another tenant, as unknown as ever
            b.delete(job.id)


def test_a_tenant_never_sees_another_tenants_job_through_the_sdk(api_url, settings, tmp_path):  # noqa: F811
    with Client(api_url, "key-a") as a, Client(api_url, "key-b") as b:
        job = a.submit(SMALL)
        for call in (
            b.get,
            b.cancel,
            b.result,
            lambda i: b.wait(i, timeout_s=5),
            lambda i: b.download(i, tmp_path),
        ):
            with pytest.raises(NotFound):
                call(job.id)
        assert job.id not in [j.id for j in b.list()[0]]
        assert a.get(job.id).status.value == "queued"  # b's cancel did nothing
        events = httpx.get(f"{api_url}/v1/jobs/{job.id}/events", headers={"Authorization": "Bearer key-b"})
        assert events.status_code == 404


def _read_events(url: str, headers: dict[str, str], stop_after: int | None = None) -> list[tuple[str, str]]:
    """(id, event name) of each event of an SSE response, until it ends or ``stop_after`` events."""
    events: list[tuple[str, str]] = []
    with httpx.stream("GET", url, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        event_id = name = ""
        for line in response.iter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                name = line[7:]
            elif line == "" and event_id:
                events.append((event_id, name))
                event_id = ""
                if stop_after is not None and len(events) == stop_after:
                    return events  # leaves mid-stream: the connection is closed
    return events


def test_events_resume_with_last_event_id_once_each_and_end_after_the_terminal_one(
    api_url,
    settings,  # noqa: F811
    start_worker,
    redis_client,
):
    start_worker(settings)
    job_id = httpx.post(f"{api_url}/v1/jobs", json=LONG, headers={"Authorization": "Bearer key-a"}).json()[
        "id"
    ]
    url = f"{api_url}/v1/jobs/{job_id}/events"
    auth = {"Authorization": "Bearer key-a"}

    first = _read_events(url, auth, stop_after=3)
    rest = _read_events(url, auth | {"Last-Event-ID": first[-1][0]})

    received = first + rest
    stored = [
        entry_id.decode() for entry_id, _ in redis_client.xrange(Keys(settings.key_prefix).job_events(job_id))
    ]
    assert [event_id for event_id, _ in received] == stored  # every event, in order, none twice
    assert received[0][1] == "queued" and received[1][1] == "started"
    assert received[-1][1] == "succeeded"
    assert [name for _, name in received].count("progress") == LONG["steps"]
    # After the terminal event there is nothing more: a reconnect from it ends at once.
    started = time.monotonic()
    assert _read_events(url, auth | {"Last-Event-ID": received[-1][0]}) == []
    assert time.monotonic() - started < 2
    bad = httpx.get(url, headers=auth | {"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422


def test_prefer_wait_returns_a_small_jobs_outputs_in_one_response(api_url, settings, start_worker):  # noqa: F811
    start_worker(settings)
    with Client(api_url, "key-a") as fleet:  # the first job loads the model; later ones find it
        fleet.wait(fleet.submit(SMALL | {"seed": 2}).id, timeout_s=180)
    response = httpx.post(
        f"{api_url}/v1/jobs",
        json=SMALL,
        headers={"Authorization": "Bearer key-a", "Prefer": "wait=10"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    assert response.headers["Preference-Applied"] == "wait=10"
    job = response.json()
    assert job["status"] == "succeeded"
    [output] = job["outputs"]
    assert Image.open(io.BytesIO(httpx.get(output["url"]).content)).size == (64, 80)
    with Client(api_url, "key-a") as fleet:  # the SDK's way to ask for it
        record = fleet.submit(SMALL | {"seed": 3}, wait_s=10)
        assert record.status.value == "succeeded" and record.outputs


def test_prefer_wait_gives_202_when_the_job_outlasts_it_and_is_refused_past_the_setting(
    settings,  # noqa: F811
    tmp_path,
    redis_client,
):
    edge = Settings.model_validate(settings.model_dump() | {"max_prefer_wait_s": 3})
    with ApiProcess(edge, tmp_path / "api.log").wait_ready(60) as process:
        auth = {"Authorization": "Bearer key-a"}
        started = time.monotonic()
        at_edge = httpx.post(
            f"{process.url}/v1/jobs", json=SMALL, headers=auth | {"Prefer": "wait=3"}, timeout=30
        )
        elapsed_s = time.monotonic() - started
        assert at_edge.status_code == 202, at_edge.text  # no worker: still queued
        assert at_edge.json()["status"] == "queued"
        assert 3 <= elapsed_s < 6

        past = httpx.post(
            f"{process.url}/v1/jobs", json=SMALL | {"seed": 1}, headers=auth | {"Prefer": "wait=4"}
        )
        assert past.status_code == 422
        assert past.json()["errors"][0]["field"] == "Prefer"
        assert redis_client.zcard(Keys(edge.key_prefix).tenant_jobs("a")) == 1  # nothing queued for it
