"""A tenant's usage through a real uvicorn API process, a real GPU worker process and real Redis:
the GPU time the worker measured and the outputs it stored, read back by ``GET /v1/usage``, the
HTTP SDK, the Redis SDK and the CLI, each tenant its own; the query's limits at their edge. A
tenant's GPU budget for the month refuses its new jobs once its ended ones used it, on every door,
at its edge."""

from __future__ import annotations

import datetime as dt
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from producer import cli
from producer.client import Client
from producer.http import Client as HttpClient
from routing.errors import OverBudget
from routing.jobs.usage import Usage, next_month_at
from routing.settings import Settings
from tests.api_tenants import SMALL, A, B, api_client, tenants, with_tenants

pytestmark = pytest.mark.integration

MAX_DAYS = 7


@pytest.fixture
def settings(fleet_settings: Settings) -> Settings:
    return with_tenants(fleet_settings, "a", "b", usage_max_days=MAX_DAYS)


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[httpx.Client]:
    with api_client(settings, tmp_path) as http:
        yield http


def _wait(api: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 180
    while (job := api.get(f"/v1/jobs/{job_id}", headers=A).json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_a_tenants_usage_is_its_jobs_gpu_time_and_outputs_on_every_door(api, settings, start_worker):
    # Canceled while queued (no worker yet): it counts as an end, with no GPU time.
    canceled = api.post("/v1/jobs", json=SMALL, headers=A).json()["id"]
    assert api.delete(f"/v1/jobs/{canceled}", headers=A).json()["status"] == "canceled"
    start_worker(settings)
    job = _wait(api, api.post("/v1/jobs", json=SMALL | {"num_outputs": 2}, headers=A).json()["id"])
    assert job["status"] == "succeeded", job["error"]
    today = dt.datetime.now(dt.UTC).date()

    response = api.get("/v1/usage", headers=A)

    assert response.status_code == 200, response.text
    usage = response.json()
    # By default the month to date; past its 7th day, the last FLEET_USAGE_MAX_DAYS (7 here) days.
    month_to_date = max(today.replace(day=1), today - dt.timedelta(days=MAX_DAYS - 1))
    assert (usage["tenant"], usage["start"], usage["end"]) == ("a", str(month_to_date), str(today))
    held = job["timings"]["held_s"]
    # The worker's measure: claim to the end of generation, less the cold load; the store and
    # the record's write come after it.
    assert 0 < held <= job["timings"]["run_s"] - job["timings"].get("load_s", 0.0)
    sizes = sum(o["size_bytes"] for o in job["outputs"])
    gpu16 = {"date": str(today), "model": "z-image-turbo", "vram_class": "gpu16"}
    assert usage["rows"] == [
        gpu16
        | {"status": "canceled", "jobs": 1, "gpu_s": 0.0, "held_s": 0.0, "outputs": 0, "output_bytes": 0}
        | {"video_s": 0.0},
        gpu16
        | {"status": "succeeded", "jobs": 1, "gpu_s": held, "held_s": held, "outputs": 2}
        | {"output_bytes": sizes, "video_s": 0.0},
    ]
    assert usage["totals"] == {"jobs": 2, "gpu_s": held, "outputs": 2, "output_bytes": sizes, "video_s": 0.0}
    # Another tenant's usage is its own: none.
    theirs = api.get("/v1/usage", headers=B).json()
    assert (theirs["tenant"], theirs["rows"], theirs["totals"]["jobs"]) == ("b", [], 0)

    # The same answer from the HTTP SDK, the Redis SDK and the CLI over either.
    with HttpClient(str(api.base_url), "key-a") as http:
        assert http.usage().to_json() == usage
    with Client(settings) as fleet:
        assert fleet.usage(tenant="a").to_json() == usage
    code, out, _err = _cli("--api", str(api.base_url), "--key", "key-a", "usage", "--json")
    assert code == 0 and json.loads(out) == usage
    code, out, _err = _cli("--api", str(api.base_url), "--key", "key-a", "usage", "--start", str(today))
    assert code == 0, _err
    lines = out.splitlines()
    assert lines[0] == f"tenant a, {today} to {today} (UTC)"
    assert lines[1].split() == [
        "date",
        "model",
        "class",
        "status",
        "jobs",
        "gpu_s",
        "outputs",
        "bytes",
        "video_s",
    ]
    assert lines[3].split()[:5] == [str(today), "z-image-turbo", "gpu16", "succeeded", "1"]
    assert lines[-1].split() == ["total", "2", f"{held:.1f}", "2", str(sizes), "0.0"]
    assert Usage.from_json(usage).totals.output_bytes == sizes


def test_a_usage_query_is_refused_past_its_limits(api, settings):
    today = dt.datetime.now(dt.UTC).date()

    def ask(headers: dict[str, str] | None = A, **params: str) -> httpx.Response:
        return api.get("/v1/usage", params=params, headers=headers or {})

    # The edge: FLEET_USAGE_MAX_DAYS days is one query; one more is refused, naming the setting.
    at_most = ask(start=str(today - dt.timedelta(days=MAX_DAYS - 1)))
    assert at_most.status_code == 200, at_most.text
    over = ask(start=str(today - dt.timedelta(days=MAX_DAYS)))
    assert over.status_code == 422
    [error] = over.json()["errors"]
    assert error["field"] == "start" and f"at most {MAX_DAYS}" in error["message"]
    assert "FLEET_USAGE_MAX_DAYS" in error["message"]
    backwards = ask(start=str(today), end=str(today - dt.timedelta(days=1)))
    assert backwards.status_code == 422 and "after end" in backwards.text
    assert ask(start="2026-13-01").status_code == 422
    assert ask(headers=None).status_code == 401
    # The CLI says the same, and exits 2.
    start = str(today - dt.timedelta(days=MAX_DAYS))
    code, _out, err = _cli("--api", str(api.base_url), "--key", "key-a", "usage", "--start", start)
    assert code == 2 and "FLEET_USAGE_MAX_DAYS" in err


def test_a_tenant_past_its_gpu_budget_for_the_month_gets_no_new_job_on_any_door(
    fleet_settings, tmp_path, start_worker
):
    budget = 0.01  # GPU-seconds: less than any job the worker runs
    settings = Settings.model_validate(
        fleet_settings.model_dump() | {"tenants": tenants("a", gpu_s_per_month=budget) | tenants("b")}
    )
    once = A | {"Idempotency-Key": "once"}
    with api_client(settings, tmp_path) as api:
        first = api.post("/v1/jobs", json=SMALL, headers=once)
        assert first.status_code == 201, first.text  # nothing used yet this month
        start_worker(settings)
        job = _wait(api, first.json()["id"])
        assert job["status"] == "succeeded" and job["timings"]["held_s"] >= budget

        refused = api.post("/v1/jobs", json=SMALL, headers=A)

        assert refused.status_code == 402, refused.text
        assert "gpu_s_per_month" in refused.json()["detail"]
        next_month = next_month_at(dt.datetime.now(dt.UTC).date())
        assert abs(time.time() + int(refused.headers["Retry-After"]) - next_month) <= 5
        assert [j["id"] for j in api.get("/v1/jobs", headers=A).json()["jobs"]] == [job["id"]]
        # Its job asked for again by its key is answered: it is no new job.
        again = api.post("/v1/jobs", json=SMALL, headers=once)
        assert (again.status_code, again.json()["id"]) == (200, job["id"])
        with HttpClient(str(api.base_url), "key-a") as fleet, pytest.raises(OverBudget) as raised:
            fleet.submit(SMALL)
        assert abs(raised.value.retry_at - next_month) <= 5
        sdk = openai.OpenAI(base_url=f"{str(api.base_url).rstrip('/')}/v1", api_key="key-a", max_retries=0)
        with pytest.raises(openai.RateLimitError) as quota:
            sdk.images.generate(model="z-image-turbo", prompt="a fox", size="64x64")
        assert quota.value.code == "insufficient_quota"
        assert quota.value.response.headers["x-should-retry"] == "false"
        # Another tenant's budget is its own: b has none.
        assert api.post("/v1/jobs", json=SMALL, headers=B).status_code == 201
        assert [j["id"] for j in api.get("/v1/jobs", headers=A).json()["jobs"]] == [job["id"]]
        # Its usage says what it counts against.
        usage = api.get("/v1/usage", headers=A).json()
        assert (usage["gpu_s_per_month"], usage["totals"]["gpu_s"]) == (budget, job["timings"]["held_s"])
        assert api.get("/v1/usage", headers=B).json()["gpu_s_per_month"] is None
        code, out, _err = _cli("--api", str(api.base_url), "--key", "key-a", "usage")
        assert code == 0 and "GPU budget: 0.01 GPU-seconds a month" in out
    # The edge, through the Redis SDK: what the month used refuses; a hair more takes one more job.
    with Client(settings) as client:
        used = client.usage(tenant="a").totals.gpu_s
        with pytest.raises(OverBudget):
            client.submit(SMALL, tenant="a", gpu_s_per_month=used)
        assert client.submit(SMALL, tenant="a", gpu_s_per_month=used + 0.001).created
        with pytest.raises(OverBudget):  # 0: no new job, whatever was used
            client.submit(SMALL, tenant="fresh", gpu_s_per_month=0)
