"""What the HTTP API lets one tenant ask of the fleet before anything runs: a real uvicorn process,
real Redis, no GPU worker (jobs stay queued). Ids are checked before they name a key; priorities
are the tenant's to use or not."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from localfleet.process import ApiProcess
from routing.classes import VramClass
from routing.jobs import lifecycle
from routing.jobs.eta import record_duration
from routing.jobs.keys import Keys
from routing.jobs.record import JobStatus
from routing.jobs.workers import heartbeat
from routing.settings import Settings
from tests.conftest import _free_port
from tests.faults.harness import RedisServer, wait_for

pytestmark = pytest.mark.integration

SMALL = {"model": "z-image-turbo", "kind": "text-to-image", "prompt": "a fox", "width": 64, "height": 64}
A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def tenants() -> dict[str, dict]:
    return {
        "a": {"api_keys": ["key-a"], "webhook_secret": secret()},
        "b": {"api_keys": ["key-b"], "webhook_secret": secret(), "priorities": ["high", "normal", "low"]},
    }


@pytest.fixture
def settings(fleet_settings: Settings) -> Settings:
    return Settings.model_validate(
        fleet_settings.model_dump() | {"tenants": tenants(), "expiry_sweep_interval_s": 3600}
    )


def start_api(settings: Settings, tmp_path: Path) -> ApiProcess:
    return ApiProcess(settings, tmp_path / f"api-{_free_port()}.log").wait_ready(60)


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[httpx.Client]:
    with start_api(settings, tmp_path) as process:
        with httpx.Client(base_url=process.url, timeout=30, trust_env=False) as http:
            yield http


def submit(api: httpx.Client, headers: dict[str, str], **extra: object) -> httpx.Response:
    return api.post("/v1/jobs", json=SMALL | extra, headers=headers)


# --- job ids are checked at the edge -------------------------------------------------------------


def test_a_malformed_job_id_is_a_404_on_every_route(api):
    job_id = submit(api, A).json()["id"]
    malformed = [f"{job_id}:events", "abc:events", job_id.upper(), job_id + "0", job_id[:-1], "*"]
    for bad in malformed:
        answers = {
            "get": api.get(f"/v1/jobs/{bad}", headers=A),
            "cancel": api.delete(f"/v1/jobs/{bad}", headers=A),
            "events": api.get(f"/v1/jobs/{bad}/events", headers=A),
            "webhooks": api.get(f"/v1/jobs/{bad}/webhooks", headers=A),
            "replay": api.post(f"/v1/jobs/{bad}/webhooks/x/replay", headers=A),
        }
        assert {route: r.status_code for route, r in answers.items()} == dict.fromkeys(answers, 404), bad
    # The well-formed id still answers, and the job was not touched by any of the above.
    assert api.get(f"/v1/jobs/{job_id}", headers=A).json()["status"] == "queued"


# --- priorities are the tenant's setting ----------------------------------------------------------


def test_high_priority_is_refused_to_a_tenant_not_given_it_before_anything_is_queued(api, settings):
    refused = submit(api, A, priority="high")
    assert refused.status_code == 422, refused.text
    [error] = refused.json()["errors"]
    assert error["field"] == "priority" and "normal, low" in error["message"], error
    assert api.get("/v1/jobs", headers=A).json()["jobs"] == []  # nothing queued
    # The default priorities are served, and a tenant given "high" may use it.
    assert [submit(api, A, priority=p).status_code for p in ("normal", "low")] == [201, 201]
    assert submit(api, A).status_code == 201  # no priority: normal
    high = submit(api, B, priority="high")
    assert high.status_code == 201, high.text
    assert (high.json()["priority"], high.json()["queue"]) == ("high", "gpu16.high")


def test_a_tenant_may_be_given_low_priority_only(fleet_settings, tmp_path):
    only_low = tenants() | {"a": tenants()["a"] | {"priorities": ["low"]}}
    settings = Settings.model_validate(fleet_settings.model_dump() | {"tenants": only_low})
    with (
        start_api(settings, tmp_path) as process,
        httpx.Client(base_url=process.url, trust_env=False) as http,
    ):
        assert [submit(http, A, priority=p).status_code for p in ("high", "normal", "low")] == [422, 422, 201]
        assert submit(http, A).status_code == 422  # normal, by default


# --- queue position and ETA cost the same whatever else Redis holds ----------------------------


def commands_run(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(s["calls"]) for name, s in stats.items()}


@pytest.fixture
def own_server(settings: Settings, tmp_path: Path) -> Iterator[tuple[httpx.Client, redis.Redis, ApiProcess]]:
    """The API on a redis-server of the test's own, a client of that server, and the API's
    process: its ``commandstats`` count this test's commands only, and it may be made to drop
    and refuse every client (on the suite's shared server other processes' commands land in the
    same counters, and their connections would be dropped too)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    client = server.client()
    own = settings.model_copy(update={"redis_url": server.url})
    try:
        with (
            start_api(own, tmp_path) as process,
            httpx.Client(base_url=process.url, timeout=30, trust_env=False) as http,
        ):
            yield http, client, process
    finally:
        client.close()
        server.stop()


def test_listing_queued_jobs_costs_a_bounded_number_of_commands_per_job_with_many_keys(own_server, settings):
    api, redis_client, _ = own_server
    keys = Keys(settings.key_prefix)
    for n in range(3):  # live workers, so that every job gets an ETA
        heartbeat(redis_client, keys, f"w{n}@host:1:{n}", VramClass.GPU16, ttl_s=600)
    record_duration(redis_client, keys, "z-image-turbo", VramClass.GPU16, 2.0)
    ids = [submit(api, A).json()["id"] for _ in range(40)]
    dummy = f"{settings.key_prefix}:dummy"
    try:
        with redis_client.pipeline(transaction=False) as pipe:
            for start in range(0, 200_000, 2000):
                pipe.mset({f"{dummy}:{i}": b"x" for i in range(start, start + 2000)})
            pipe.execute()
        assert redis_client.dbsize() > 200_000

        redis_client.config_resetstat()
        page = api.get("/v1/jobs", params={"limit": 100}, headers=A)
        calls = commands_run(redis_client)
    finally:
        for start in range(0, 200_000, 10_000):
            redis_client.unlink(*(f"{dummy}:{i}" for i in range(start, start + 10_000)))

    jobs = page.json()["jobs"]
    assert sorted(j["id"] for j in jobs) == sorted(ids)
    assert sorted(j["queue_position"] for j in jobs) == list(range(40))
    assert all(j["eta_s"] is not None for j in jobs)  # the workers were found
    assert "scan" not in calls and "keys" not in calls, calls
    spent = sum(n for name, n in calls.items() if name not in ("info", "config|resetstat"))
    # Paging and records: a few commands; each job: its rank and the lines ahead of it.
    assert spent <= 10 + 3 * len(jobs), calls


def test_eta_is_the_measured_run_time_times_the_line_shared_by_the_workers(api, settings, redis_client):
    """ETA = (position / live workers consuming the queue + 1) x the model's moving-average run
    time on the queue's class. The formula is exact; the 0.5 % tolerance only absorbs the float
    round trip through Redis and JSON. Catches: an ETA that ignores the position, the number of
    workers, the model or class the time was
    measured for, or the moving average (the last run alone, or the first)."""
    keys = Keys(settings.key_prefix)
    # One gpu16 worker and one gpu80 (which takes gpu16 work when idle): two share the line.
    # A gpu80-only figure, ten times slower, must not price a gpu16 job.
    heartbeat(redis_client, keys, "w0@host:1:0", VramClass.GPU16, ttl_s=600)
    heartbeat(redis_client, keys, "w1@host:1:1", VramClass.GPU80, ttl_s=600)
    for seconds in (2.0, 4.0):  # moving average, newest weighing 0.2: 2.0 + 0.2 x (4.0 - 2.0)
        record_duration(redis_client, keys, "z-image-turbo", VramClass.GPU16, seconds)
    record_duration(redis_client, keys, "z-image-turbo", VramClass.GPU80, 24.0)
    run_s = 2.4

    def etas(ids: list[str]) -> list[tuple[int, float]]:
        jobs = [api.get(f"/v1/jobs/{job_id}", headers=A).json() for job_id in ids]
        return [(j["queue_position"], j["eta_s"]) for j in jobs]

    def expected(positions: range, workers: int) -> list[tuple[int, float]]:
        return [(p, pytest.approx((p / workers + 1) * run_s, rel=0.005)) for p in positions]

    ids = [submit(api, A, seed=n).json()["id"] for n in range(5)]
    assert etas(ids) == expected(range(5), workers=2)  # 2.4, 3.6, 4.8, 6.0, 7.2 s

    # A high-priority job goes ahead of them all: each is one place further back, run_s / 2 later.
    high = submit(api, B, priority="high").json()
    assert (high["queue_position"], high["eta_s"]) == (0, pytest.approx(run_s, rel=0.005))
    assert etas(ids) == expected(range(1, 6), workers=2)
    # The first one canceled: the rest move up; a third worker: the line is shared three ways.
    assert api.delete(f"/v1/jobs/{ids[0]}", headers=A).status_code == 200
    heartbeat(redis_client, keys, "w2@host:1:2", VramClass.GPU16, ttl_s=600)
    assert etas(ids[1:]) == expected(range(1, 5), workers=3)
    # No live worker takes the queue: no honest number (the position still stands).
    for name in ("w0@host:1:0", "w1@host:1:1", "w2@host:1:2"):
        redis_client.delete(keys.worker(name))
    assert etas(ids[1:]) == [(p, None) for p in range(1, 5)]


# --- submits and cancels are rationed; a canceled job costs the fleet nothing -------------------

SUBMITS, CANCELS, CANCELED_TTL_S = 3, 2, 120


@pytest.fixture
def rationed(settings: Settings, tmp_path: Path) -> Iterator[httpx.Client]:
    limits = {"submits_per_tenant": SUBMITS, "cancels_per_tenant": CANCELS, "rate_window_s": 60}
    with start_api(settings.model_copy(update=limits), tmp_path) as process:
        with httpx.Client(base_url=process.url, timeout=30, trust_env=False) as http:
            yield http


def test_submits_are_rationed_per_tenant_with_retry_after(rationed):
    answers = [submit(rationed, A) for _ in range(SUBMITS)]
    assert [r.status_code for r in answers] == [201] * SUBMITS  # at the limit: accepted
    over = submit(rationed, A)
    assert over.status_code == 429, over.text
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    assert len(rationed.get("/v1/jobs", headers=A).json()["jobs"]) == SUBMITS  # nothing more queued
    assert submit(rationed, B).status_code == 201  # another tenant is served meanwhile


def test_cancels_are_rationed_per_tenant_with_retry_after(rationed):
    ids = [submit(rationed, A).json()["id"] for _ in range(CANCELS + 1)]
    answers = [rationed.delete(f"/v1/jobs/{job_id}", headers=A) for job_id in ids[:CANCELS]]
    assert [(r.status_code, r.json()["status"]) for r in answers] == [(200, "canceled")] * CANCELS
    over = rationed.delete(f"/v1/jobs/{ids[-1]}", headers=A)
    assert over.status_code == 429, over.text
    assert 1 <= int(over.headers["Retry-After"]) <= 60
    assert rationed.get(f"/v1/jobs/{ids[-1]}", headers=A).json()["status"] == "queued"
    other = submit(rationed, B).json()["id"]
    assert rationed.delete(f"/v1/jobs/{other}", headers=B).json()["status"] == "canceled"


def test_a_canceled_queued_job_leaves_its_queue_and_is_kept_only_its_ttl(fleet_settings, tmp_path):
    settings = Settings.model_validate(
        fleet_settings.model_dump() | {"tenants": tenants(), "canceled_job_ttl_s": CANCELED_TTL_S}
    )
    keys = Keys(settings.key_prefix)
    raw = redis.Redis.from_url(settings.redis_url)
    with (
        start_api(settings, tmp_path) as process,
        httpx.Client(base_url=process.url, trust_env=False) as http,
    ):
        first = http.post("/v1/jobs", json=SMALL, headers=A | {"Idempotency-Key": "k1"}).json()["id"]
        second = submit(http, A).json()["id"]
        assert raw.llen("gpu16") == 2  # what the autoscaler counts
        assert http.delete(f"/v1/jobs/{first}", headers=A).json()["status"] == "canceled"
        [left] = raw.lrange("gpu16", 0, -1)
        assert first not in left.decode() and second in left.decode()
        assert 0 < raw.ttl(keys.job(first)) <= CANCELED_TTL_S
        assert 0 < raw.ttl(keys.job_events(first)) <= CANCELED_TTL_S
        assert 0 < raw.ttl(keys.idempotency("a:k1")) <= CANCELED_TTL_S
        assert raw.hget(keys.job(second), "queued_message") is not None  # the other job untouched
    raw.close()


def test_a_handed_back_job_canceled_in_its_queue_leaves_it_too(client):
    job = client.submit(SMALL | {"kind": "text-to-image"})
    raw = client.store.client
    assert raw.rpop("gpu16") is not None  # a worker took the message
    client.store.move(job.id, lifecycle.claim(client.get(job.id), "w1", time.time()))
    assert raw.hget(client.keys.job(job.id), "queued_message") is None  # no longer queued
    client.store.move(job.id, lifecycle.hand_back("gpu16", "its worker stopped", owner="w1"))
    assert raw.llen("gpu16") == 1
    assert client.cancel(job.id).status is JobStatus.CANCELED
    assert raw.llen("gpu16") == 0


# --- open event streams and Prefer: wait submits are bounded per tenant and per process ---------


@pytest.fixture
def bounded(settings: Settings, tmp_path: Path) -> Iterator[httpx.Client]:
    limits = {
        "tenants": tenants() | {"c": {"api_keys": ["key-c"], "webhook_secret": secret()}},
        "event_streams_per_tenant": 2,
        "event_streams_per_api": 3,
        "prefer_waits_per_tenant": 1,
        "prefer_waits_per_api": 2,
    }
    with start_api(Settings.model_validate(settings.model_dump() | limits), tmp_path) as process:
        with httpx.Client(base_url=process.url, timeout=30, trust_env=False) as http:
            yield http


def open_stream(api: httpx.Client, headers: dict[str, str], job_id: str) -> httpx.Response:
    return api.send(api.build_request("GET", f"/v1/jobs/{job_id}/events", headers=headers), stream=True)


def test_event_streams_are_bounded_per_tenant_and_per_process(bounded):
    job_a, job_b = submit(bounded, A).json()["id"], submit(bounded, B).json()["id"]
    held = [open_stream(bounded, A, job_a) for _ in range(2)]  # at the tenant's limit
    try:
        assert [r.status_code for r in held] == [200, 200]
        over = open_stream(bounded, A, job_a)
        assert over.status_code == 429 and over.headers["Retry-After"] == "5"
        over.close()
        other = open_stream(bounded, B, job_b)  # another tenant is served meanwhile
        held.append(other)
        assert other.status_code == 200
        lines = other.iter_lines()  # kept: a dropped iterator closes its response
        assert next(lines).startswith("id: ")  # it streams the job's events
        process_full = open_stream(bounded, B, job_b)  # 3 open in the process
        assert process_full.status_code == 429
        process_full.close()
        assert submit(bounded, B).status_code == 201  # other routes are answered
        held.pop(0).close()  # a stream that ends gives its place back
        deadline = time.monotonic() + 10
        while (again := open_stream(bounded, B, job_b)).status_code == 429 and time.monotonic() < deadline:
            again.close()
            time.sleep(0.1)
        held.append(again)
        assert again.status_code == 200
    finally:
        for response in held:
            response.close()


def test_prefer_wait_submits_are_bounded_per_tenant_and_per_process_before_queueing(bounded):
    C = {"Authorization": "Bearer key-c"}
    answers: dict[str, int] = {}

    def wait_submit(name: str, headers: dict[str, str]) -> None:
        answers[name] = bounded.post(
            "/v1/jobs", json=SMALL, headers=headers | {"Prefer": "wait=6"}
        ).status_code

    threads = [threading.Thread(target=wait_submit, args=args) for args in (("a", A), ("b", B))]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(
        bounded.get("/v1/jobs", headers=h).json()["jobs"] for h in (A, B)
    ):
        time.sleep(0.05)
    # a holds its one wait, b its own: the process holds its two.
    over = bounded.post("/v1/jobs", json=SMALL, headers=A | {"Prefer": "wait=6"})
    assert over.status_code == 429 and over.headers["Retry-After"] == "5"
    process_full = bounded.post("/v1/jobs", json=SMALL, headers=C | {"Prefer": "wait=6"})
    assert process_full.status_code == 429
    assert len(bounded.get("/v1/jobs", headers=A).json()["jobs"]) == 1  # nothing more queued
    assert bounded.get("/v1/jobs", headers=C).json()["jobs"] == []
    assert submit(bounded, C).status_code == 201  # a submit that does not wait is served
    for thread in threads:
        thread.join()
    assert answers == {"a": 202, "b": 202}  # still queued after their wait: no worker runs
    assert bounded.post("/v1/jobs", json=SMALL, headers=A | {"Prefer": "wait=1"}).status_code == 202


def test_a_queued_job_whose_wait_fails_is_answered_202_not_an_error(own_server):
    _wait_fails_after_queueing(*own_server)


def _wait_fails_after_queueing(api: httpx.Client, redis_client: redis.Redis, process: ApiProcess) -> None:
    answer: list[httpx.Response] = []
    thread = threading.Thread(
        target=lambda: answer.append(
            api.post("/v1/jobs", json=SMALL, headers=A | {"Prefer": "wait=20"}, timeout=60)
        )
    )
    thread.start()
    # The job is queued and the wait blocked in its read of the job's events.
    wait_for(
        lambda: any(c["cmd"] == "xread" and "b" in c["flags"] for c in redis_client.client_list()),
        10,
        "the wait blocked in XREAD",
    )
    # Redis drops the API's connections and takes no new ones until the API gives up the wait
    # (it then reads the job back, once Redis takes clients again).
    redis_client.config_set("maxclients", 1)
    try:
        redis_client.client_kill_filter(_type="normal", skipme=True)
        wait_for(lambda: "answering 202" in process.log(), 30, "the API giving up its wait")
    finally:
        redis_client.config_set("maxclients", 10000)
    thread.join(60)
    [response] = answer
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
