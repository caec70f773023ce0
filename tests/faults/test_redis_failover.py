"""Redis fails over: a master with two replicas, watched by three Sentinels (real
``redis-server --sentinel`` processes), and the fleet configured with ``FLEET_REDIS_SENTINELS``.
The master is killed -9 while jobs are queued and running; the Sentinels promote a replica and
the workers, the Redis SDK and the API follow it: no job is lost, each succeeds once, and the
workers go on consuming. A submit is answered only once ``FLEET_REDIS_MIN_REPLICAS`` replicas
hold it, tested at its edge, and so is a job answered again by its idempotency key (the Redis
SDK, the API and the OpenAI door). The same failover with TLS everywhere, once; and once just
after the Sentinels stalled into TILT, which the harness waits out before a fault."""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from localfleet.process import WorkerProcess
from producer.client import Client
from producer.events import JobEvents
from routing.errors import NotReplicated
from routing.io.storage import LocalStorage
from routing.jobs.events import EventType, Webhook
from routing.jobs.keys import Keys
from routing.jobs.record import JobStatus
from routing.jobs.store import Created
from routing.settings import Settings
from tests.api_tenants import SMALL, A, api_client, tenants
from tests.conftest import _free_port
from tests.faults.conftest import fault_settings
from tests.faults.harness import (
    ReplicatedRedis,
    TlsFiles,
    event_types,
    small_request,
    wait_for,
    wait_log,
    wait_running_and_queued,
    wait_warm,
)
from tests.flower_api import http, poll, queue_lengths, running_flower
from tests.webhook_receiver import Receiver
from worker import held
from worker.media import encode_png

pytestmark = pytest.mark.integration

JOBS = 10
PNG = encode_png(Image.new("RGB", (64, 64), (10, 200, 30)))  # an image to edit


@pytest.fixture
def replicated(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReplicatedRedis]:
    """The master, replicas and Sentinels; parametrized ``"tls"`` (indirect), they speak only
    TLS, replication and the Sentinels' own links included, with a CA of the test's own."""
    tls = TlsFiles.make(tmp_path / "tls") if getattr(request, "param", None) == "tls" else None
    group = ReplicatedRedis(tmp_path / "redis", replicas=2, sentinels=3, tls=tls)
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture
def fleet_settings(replicated: ReplicatedRedis, small_models_dir: Path, tmp_path: Path) -> Settings:
    """Every process on the Sentinels' master; a submit waits for one replica, up to 10 s (a
    replica of a loaded test machine can fall a second behind; the tests at the edge of the wait
    set their own)."""
    return fault_settings(
        # The host is not used: the Sentinels name the master. The database and, with rediss://,
        # the TLS options are.
        replicated.url,
        small_models_dir,
        tmp_path,
        redis_sentinels=replicated.addresses,
        redis_sentinel_master=ReplicatedRedis.MASTER,
        redis_min_replicas=1,
        redis_replica_timeout_ms=10_000,
        tenants=tenants("a"),
    )


def test_master_killed_with_jobs_queued_and_running_loses_none(
    client: Client, start_worker, fleet_settings: Settings, replicated: ReplicatedRedis, tmp_path: Path
):
    workers = [start_worker(), start_worker()]
    for worker in workers:
        wait_warm(worker)
    with api_client(fleet_settings, tmp_path) as api:
        through_api = api.post("/v1/jobs", json={**SMALL, "prompt": "fault:sleep=0.3"}, headers=A)
        assert through_api.status_code == 201, through_api.text
        jobs = [client.submit(small_request(f"job {i} fault:sleep=0.3", steps=6)) for i in range(JOBS)]
        states = wait_running_and_queued(client, jobs)

        old, new = replicated.kill_master()
        assert new is not old

        records = [j.wait(timeout_s=240) for j in jobs]
        failures = {r.id: (r.status.value, r.error) for r in records if r.status is not JobStatus.SUCCEEDED}
        assert not failures, (states, failures, replicated.logs())
        for record in records:
            assert event_types(client.store, record.id).count("job.succeeded") == 1
        _api_follows(api, through_api.json()["id"])
        again = api.post("/v1/jobs", json=SMALL, headers=A)
        assert again.status_code == 201, again.text

    storage = LocalStorage(fleet_settings.storage_dir)
    assert len(storage.list("jobs/")) >= JOBS
    # Both workers still consume, from the new master: once each has its broker connection back
    # (Celery retries it on a backoff of its own), a second batch runs on both of them.
    for worker in workers:
        wait_log(worker, "Connected to sentinel://", count=2)
    after = [client.submit(small_request(f"after {i} fault:sleep=0.2", steps=3)) for i in range(6)]
    # Their main processes still record the messages they take (worker.held): the Sentinel
    # transport they reconnected with is the fleet's, not Kombu's own.
    wait_for(lambda: _held_messages(client), 60, "messages taken after the failover recorded as held")
    after_records = [j.wait(timeout_s=120) for j in after]
    assert all(r.status is JobStatus.SUCCEEDED for r in after_records)
    assert all(w.proc.poll() is None for w in workers)
    assert len({r.worker for r in after_records}) == 2, [r.worker for r in after_records]

    # The old master comes back as a replica of the new one: the set can fail over again.
    old.start()
    wait_for(lambda: replicated.online_replicas() == 2, 60, "the old master following the new one")
    with old.client() as back:
        assert back.info("replication")["role"] == "slave"


def _api_follows(api: httpx.Client, job_id: str) -> None:
    """The API follows the new master: its job, read and streamed over its own pools."""
    wait_for(lambda: api.get(f"/v1/jobs/{job_id}", headers=A).json()["status"] == "succeeded", 60, "API job")
    with api.stream("GET", f"/v1/jobs/{job_id}/events", headers=A) as stream:
        assert stream.status_code == 200
        streamed = "".join(stream.iter_text())
    assert "event: succeeded" in streamed, streamed


@pytest.mark.parametrize("replicated", ["tls"], indirect=True)
def test_over_tls_every_process_follows_the_failover_and_loses_no_job(
    client: Client, start_worker, fleet_settings: Settings, replicated: ReplicatedRedis, tmp_path: Path
):
    """With TLS everywhere and the fleet on a rediss:// FLEET_REDIS_URL that names the CA beside
    FLEET_REDIS_SENTINELS: the Redis SDK, a worker (its broker, and the transport that records
    what it holds), the API and Flower reach the Sentinels and the new master over TLS."""
    worker = start_worker()
    wait_warm(worker)
    with api_client(fleet_settings, tmp_path) as api, running_flower(fleet_settings, tmp_path) as flower:
        through_api = api.post("/v1/jobs", json={**SMALL, "prompt": "fault:sleep=0.3"}, headers=A)
        assert through_api.status_code == 201, through_api.text
        jobs = [client.submit(small_request(f"job {i} fault:sleep=0.3", steps=6)) for i in range(6)]
        wait_running_and_queued(client, jobs, running=1, queued=3)

        replicated.kill_master()

        records = [j.wait(timeout_s=240) for j in jobs]
        assert all(r.status is JobStatus.SUCCEEDED for r in records), (records, replicated.logs())
        _api_follows(api, through_api.json()["id"])
        # Flower reads the new master's queues over TLS (no job waits there now).
        poll("gpu16 on the new master", lambda: _gpu16_length(flower) == 0, flower)

    # The worker's broker came back through a Sentinel, over TLS, with its own transport.
    wait_log(worker, "Connected to sentinel://", count=2)
    after = [client.submit(small_request(f"after {i} fault:sleep=0.2", steps=3)) for i in range(3)]
    wait_for(lambda: _held_messages(client), 60, "messages taken after the failover recorded as held")
    assert all(j.wait(timeout_s=120).status is JobStatus.SUCCEEDED for j in after)


def test_producers_submitting_through_the_failover_lose_nothing(
    fleet_settings: Settings, replicated: ReplicatedRedis
):
    # Every submit waits for both replicas: whichever the Sentinels promote holds every answered
    # job (with one of two, a job answered as the master died can be held by the other alone).
    # A retry budget of about ten seconds (backoff capped at 2 s): enough for the Sentinels' few
    # seconds, not for retrying the dead master's address until it runs out. The default wait for
    # the replicas (1 s): shorter than the lost node takes to come back, so submits meet the
    # new master with one replica.
    settings = Settings.model_validate(
        fleet_settings.model_dump()
        | {"redis_retries": 10, "redis_min_replicas": 2, "redis_replica_timeout_ms": 1000}
    )
    answered: dict[int, list[tuple[float, str]]] = {thread: [] for thread in range(4)}
    not_replicated: list[str] = []
    failed: list[BaseException] = []
    stop = threading.Event()

    def submit_until_stopped(thread: int) -> None:
        with Client(settings) as client:
            while not stop.is_set():
                key = uuid.uuid4().hex
                while True:
                    try:
                        job = client.submit(small_request(f"thread {thread}"), idempotency_key=key)
                        break
                    except NotReplicated:
                        # The new master, with one replica until the lost node is back: taken,
                        # not confirmed. Submitted again with its key, as the HTTP SDK does a 503.
                        not_replicated.append(key)
                    except Exception as exc:  # unreachable past the retries: a failure of this test
                        failed.append(exc)
                        return
                answered[thread].append((time.monotonic(), job.id))

    threads = [threading.Thread(target=submit_until_stopped, args=(t,)) for t in answered]
    for thread in threads:
        thread.start()
    wait_for(lambda: all(answered.values()), 30, "every producer submitting")
    old, _new = replicated.kill_master()
    promoted_at = time.monotonic()
    # The lost node is replaced: it comes back as the new master's second replica.
    old.start()
    wait_for(lambda: replicated.online_replicas() == 2, 60, "the old master following the new one")
    wait_for(
        lambda: failed or all(jobs[-1][0] > promoted_at for jobs in answered.values()), 60, "submits after"
    )
    stop.set()
    for thread in threads:
        thread.join()
    assert not failed, failed
    # Every answered submit is on the new master, once: a submit made again after NotReplicated
    # answered the job the master had taken.
    with Client(settings) as client:
        for jobs in answered.values():
            records = client.store.get_many([job_id for _, job_id in jobs])
            lost = [
                (round(at - promoted_at, 2), job_id)
                for (at, job_id), record in zip(jobs, records, strict=True)
                if record is None or record.status is not JobStatus.QUEUED
            ]
            assert not lost, (lost, replicated.logs())
        job_ids = [job_id for jobs in answered.values() for _, job_id in jobs]
        assert len(set(job_ids)) == len(job_ids)
        assert not_replicated, "no submit met the new master before its second replica"
        assert all(client.job_of_idempotency_key(key) in job_ids for key in not_replicated)


def test_a_master_failed_over_while_up_is_left_by_the_fleets_connections(
    fleet_settings: Settings, replicated: ReplicatedRedis
):
    """The split brain: the master, paused past down-after-milliseconds, is failed over and comes
    back a master in its own eyes, with the connections it had, until the Sentinels turn it into
    a replica. The Redis SDK's pool moves to the new master as they announce it, so the next
    submit is written there: on the old master it would be lost with the old master's data. The
    API's event stream, blocked on the old master, is read again from the new one."""
    # No replicas asked for: nothing but the move keeps the submit off the old master.
    settings = Settings.model_validate(fleet_settings.model_dump() | {"redis_min_replicas": 0})
    fork = multiprocessing.get_context("fork")
    with Client(settings) as client:
        before = client.submit(small_request("before"))  # the pool holds a connection to the master
        seen: queue.Queue[EventType] = queue.Queue()
        stream = threading.Thread(target=_follow, args=(settings, client.keys, before.id, seen), daemon=True)
        stream.start()
        assert seen.get(timeout=30) is EventType.QUEUED  # then it blocks, on the master
        # A process forked with the client (as Celery's pool children are), with a connection
        # of its own to the master, follows on its own.
        to_child, from_child = fork.Queue(), fork.Queue()
        child = fork.Process(target=_submit_through_the_failover, args=(client, from_child, to_child))
        child.start()
        assert from_child.get(timeout=30) == "connected"
        old, new = replicated.pause_master()
        pool = client.store.client.connection_pool
        wait_for(lambda: pool.master_address == ("127.0.0.1", new.port), 5, "the pool on the new master")
        after = client.submit(small_request("after"))
        client.cancel(before.id)  # its event written on the new master
        assert seen.get(timeout=10) is EventType.CANCELED
        stream.join(10)
        to_child.put(("127.0.0.1", new.port))
        child_job = from_child.get(timeout=30)
        child.join(30)
        with old.client() as on_old, new.client() as on_new:
            assert on_old.info("replication")["role"] == "master"  # not yet turned into a replica
            for job_id in (after.id, child_job):
                assert on_new.exists(client.keys.job(job_id)) and not on_old.exists(client.keys.job(job_id))
        # Once the Sentinels have turned the old master into a replica, the job is still there.
        wait_for(lambda: replicated.online_replicas() == 2, 60, "the old master following the new one")
        assert client.get(after.id).status is JobStatus.QUEUED


def test_workers_leave_a_master_cut_off_for_good_and_lose_no_job(
    fleet_settings: Settings, start_worker, replicated: ReplicatedRedis, tmp_path: Path
):
    """The master stops answering and never closes its connections (a network cut): the GPU
    worker's and the webhook worker's broker connections, their blocking pops and the ack of the
    job running then among them, give it up and find the master the Sentinels promoted. That
    job and the next ones end succeeded once each, and each one's webhook is delivered."""
    settings = fleet_settings.model_copy(update={"url_allow_cidrs": ["127.0.0.2/32"]})
    receiver = Receiver(settings.tenants["a"].webhook_secret.get_secret_value())
    hook = Webhook(receiver.url("/hook"), events=("succeeded",))
    webhooks = WorkerProcess(settings, tmp_path / "webhooks.log", module="worker.webhooks").wait_ready(60)
    worker = start_worker(settings)
    try:
        wait_warm(worker)
        with Client(settings) as client:
            running = client.submit(
                small_request("running fault:sleep=1.5", steps=4), webhook=hook, tenant="a"
            )
            wait_for(lambda: client.get(running.id).step >= 1, 60, "the job running")
            old, _ = replicated.cut_off_master()
            after = [client.submit(small_request(f"after {i}"), webhook=hook, tenant="a") for i in range(3)]
            records = [job.wait(timeout_s=120) for job in (running, *after)]
            failures = {
                r.id: (r.status.value, r.error) for r in records if r.status is not JobStatus.SUCCEEDED
            }
            assert not failures, (failures, replicated.logs())
            for record in records:
                assert event_types(client.store, record.id).count("job.succeeded") == 1
            # The running job's ack went to the master cut off, and was given up (worker.held).
            wait_log(worker, "Couldn't ack", timeout_s=5)
            wait_for(lambda: len(receiver.events("job.succeeded")) == len(records), 60, "every webhook")
            assert {e["data"]["id"] for e in receiver.events("job.succeeded").values()} == {
                r.id for r in records
            }
        assert old.proc is not None and old.proc.poll() is None  # cut off all along, never back
    finally:
        webhooks.stop()
        receiver.close()


def _follow(settings: Settings, keys: Keys, job_id: str, seen: queue.Queue[EventType]) -> None:
    """The API's event stream of the job (``JobEvents``, in an event loop of its own), each
    event's type put in ``seen``, to its end."""

    async def follow() -> None:
        events = JobEvents(settings, keys, keepalive_s=30)
        try:
            async for event in events.follow(job_id):
                if event is not None:
                    seen.put(event.type)
        finally:
            await events.close()

    asyncio.run(follow())


def _submit_through_the_failover(client: Client, to_parent: Any, from_parent: Any) -> None:
    """In the forked child: a submit (a connection to the master), then, told the new master's
    address, one more once its own pool names it."""
    client.submit(small_request("from a forked child, before"))
    to_parent.put("connected")
    address = from_parent.get(timeout=60)
    pool = client.store.client.connection_pool
    wait_for(lambda: pool.master_address == address, 5, "the child's pool on the new master")
    to_parent.put(client.submit(small_request("from a forked child, after")).id)


def test_a_submit_is_answered_once_the_replicas_it_asks_for_hold_it(fleet_settings: Settings):
    # Two replicas in sync: two is the most a submit can ask for, and is answered.
    at_edge = Settings.model_validate(fleet_settings.model_dump() | {"redis_min_replicas": 2})
    with Client(at_edge) as client:
        job = client.submit(small_request("two replicas"), idempotency_key="edge")
        assert client.get(job.id).status is JobStatus.QUEUED

    past_edge = Settings.model_validate(
        fleet_settings.model_dump() | {"redis_min_replicas": 3, "redis_replica_timeout_ms": 200}
    )
    with Client(past_edge) as client:
        with pytest.raises(NotReplicated, match="2 of 3 replicas") as refused:
            client.submit(small_request("three replicas"), idempotency_key="past-edge")
        # The master has it, and so do both replicas: it is queued, its inputs kept. The same
        # submit again answers it with a new job's promise, so while three replicas are asked for
        # it is refused again; asking for the two there are, it is answered.
        (outcome, job_id), *_ = refused.value.outcomes
        assert client.get(job_id).status is JobStatus.QUEUED
        with pytest.raises(NotReplicated, match="2 of 3 replicas") as again_refused:
            client.submit(small_request("three replicas"), idempotency_key="past-edge")
        assert again_refused.value.outcomes == [(Created.EXISTS, job_id)]
        with pytest.raises(NotReplicated, match="2 of 3 replicas"):
            client.confirm_replicated(job_id)
    with Client(at_edge) as client:
        again = client.submit(small_request("three replicas"), idempotency_key="past-edge")
        assert again.id == job_id and not again.created
        client.confirm_replicated(job_id)


def test_the_api_answers_503_for_a_submit_the_replicas_do_not_confirm(
    fleet_settings: Settings, tmp_path: Path
):
    past_edge = Settings.model_validate(
        fleet_settings.model_dump() | {"redis_min_replicas": 3, "redis_replica_timeout_ms": 200}
    )
    with api_client(past_edge, tmp_path / "past") as api:
        refused = api.post("/v1/jobs", json=SMALL, headers={**A, "Idempotency-Key": "k1"})
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "5"
        assert "FLEET_REDIS_MIN_REPLICAS" in refused.json()["detail"]
        # Submitted again with its key while the replicas still fall short: 503 again, not the
        # job the master took (an answer promises the replicas hold it).
        again = api.post("/v1/jobs", json=SMALL, headers={**A, "Idempotency-Key": "k1"})
        assert again.status_code == 503, again.text
        # The OpenAI door: an edit's images stay with the job the master took, so the call
        # made again with its key is matched to it, not refused as another request.
        edit = {"data": {"prompt": "a hat", "size": "64x64"}, "files": {"image": ("a.png", PNG, "image/png")}}
        door_key = {**A, "Idempotency-Key": "e1"}
        door_refused = api.post("/v1/images/edits", headers=door_key, **edit)
        assert door_refused.status_code == 503, door_refused.text
        assert door_refused.headers["Retry-After"] == "5"
        assert api.post("/v1/images/edits", headers=door_key, **edit).status_code == 503
    # Asking for the two replicas there are, the same calls answer the jobs the master took.
    at_edge = Settings.model_validate(
        fleet_settings.model_dump() | {"redis_min_replicas": 2, "openai_wait_s": 1}
    )
    with api_client(at_edge, tmp_path / "edge") as api:
        again = api.post("/v1/jobs", json=SMALL, headers={**A, "Idempotency-Key": "k1"})
        assert again.status_code == 200, again.text
        assert again.json()["status"] == "queued"
        # No worker: the edit outlasts the wait, a 408 naming the job, the one the master took.
        waited = api.post("/v1/images/edits", headers=door_key, **edit)
        assert waited.status_code == 408, waited.text
        jobs = {job["kind"]: job["id"] for job in api.get("/v1/jobs", headers=A).json()["jobs"]}
        assert jobs == {SMALL["kind"]: again.json()["id"], "edit": waited.headers["Fleet-Job-Id"]}


def _held_messages(client: Client) -> int:
    return sum(
        client.store.client.scard(client.keys.held(holder))
        for holder in held.holders(client.store.client, client.keys)
    )


def test_flower_reads_the_queues_of_the_master_the_sentinels_name(
    client: Client, fleet_settings: Settings, replicated: ReplicatedRedis, tmp_path: Path
):
    # No worker: each job waits in gpu16, and Flower counts it there, before and after a failover.
    with running_flower(fleet_settings, tmp_path) as flower:
        client.submit(small_request("before"))
        poll("the job queued before", lambda: queue_lengths(flower).get("gpu16") == 1, flower)
        replicated.kill_master()
        client.submit(small_request("after"))
        poll("both jobs, on the new master", lambda: _gpu16_length(flower) == 2, flower)
        # The Sentinel named first in the settings goes down: Flower asks the others, as every
        # fleet process does (Flower's own client asked only the first).
        first = replicated.sentinels[0]
        first.kill()
        first.wait()
        client.submit(small_request("with the first Sentinel down"))
        poll("three jobs, the first Sentinel down", lambda: _gpu16_length(flower) == 3, flower)


def _gpu16_length(flower) -> int | None:
    """gpu16's length as Flower reads it; None for an error answer. Flower asks the Sentinels
    afresh on each request, once and without retrying: in the moment after a failover when they
    name no master yet, that request answers 500 and the next one reads the new master."""
    response = http.get(f"{flower.url}/api/queues/length", auth=flower.auth)
    if response.status_code != 200:
        return None
    return {q["name"]: q["messages"] for q in response.json()["active_queues"]}.get("gpu16")


def test_metrics_show_the_replicas_in_sync_beside_the_ones_a_submit_waits_for(
    fleet_settings: Settings, replicated: ReplicatedRedis, tmp_path: Path
):
    settings = Settings.model_validate(fleet_settings.model_dump() | {"metrics_port": _free_port()})

    def replication() -> tuple[float, float]:
        text = http.get(f"http://127.0.0.1:{settings.metrics_port}/metrics").text
        samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
        return samples["fleet_redis_replicas"], samples["fleet_redis_min_replicas"]

    with api_client(settings, tmp_path):
        assert replication() == (2, 1)
        # The dead master's replica is gone: the new master has the other one, still enough.
        replicated.kill_master()
        assert replication() == (1, 1)


def test_a_master_lost_just_after_the_sentinels_stalled_is_still_failed_over(replicated: ReplicatedRedis):
    # Every Sentinel stalls past 2 s (as when the machine pauses or its clock jumps): TILT, 30 s
    # in which they act on nothing. A master lost then is noticed only when the TILT ends, with
    # the replicas cut off from it too long for any to be promoted; the harness waits it out.
    for proc in replicated.sentinels:
        proc.send_signal(signal.SIGSTOP)
    time.sleep(2.5)
    for proc in replicated.sentinels:
        proc.send_signal(signal.SIGCONT)
    wait_for(lambda: len(replicated.tilted()) == 3, 10, "every Sentinel in TILT")

    old, new = replicated.kill_master()

    assert new is not old and new.port != old.port
    assert replicated.master() is new
