"""Paging a tenant's jobs when many share a ``created_at`` (one ``submit_many``): real Redis, a
real API process and the HTTP SDK in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from localfleet.process import ApiProcess
from producer import http
from producer.client import Client
from routing.errors import InvalidRequest
from routing.settings import Settings
from tests.integration.test_api import SMALL, settings  # noqa: F401  (the S3 + tenants settings fixture)

pytestmark = pytest.mark.integration

BATCH = 250


def submit_batch(fleet: Client, tenant: str) -> list[str]:
    jobs = fleet.submit_many([SMALL | {"seed": i} for i in range(BATCH)], tenant=tenant)
    assert len({fleet.get(j.id).created_at for j in jobs}) == 1  # one batch, one created_at
    return [j.id for j in jobs]


def every_page(
    page: Callable[[str | None], tuple[list[Any], str | None]],
    between: Callable[[list[str]], None] = lambda seen: None,
) -> list[str]:
    """The ids of every page ``page(cursor)`` gives (records, views or JSON jobs), following its
    cursors from the first; ``between`` gets the ids so far after each page but the last."""
    seen: list[str] = []
    cursor = None
    while True:
        jobs, cursor = page(cursor)
        seen += [job["id"] if isinstance(job, dict) else job.id for job in jobs]
        if cursor is None:
            return seen
        between(seen)


def test_the_redis_sdk_lists_each_job_of_a_batch_once(client: Client):
    older = client.submit(SMALL, tenant="t").id
    ids = submit_batch(client, "t")

    def leaves_the_index_at(count: int) -> Callable[[list[str]], None]:
        """The last job listed leaves the index (its record expired) once ``count`` are listed:
        the next page still starts right after it."""

        def between(seen: list[str]) -> None:
            if len(seen) == count:
                client.store.client.zrem(client.keys.tenant_jobs("t"), seen[-1])

        return between

    seen = every_page(lambda cursor: client.list(7, cursor, tenant="t"), leaves_the_index_at(70))
    assert sorted(seen) == sorted(ids + [older])
    assert len(seen) == len(set(seen))
    assert seen[-1] == older  # newest first

    # Oldest first: the same jobs the other way round (less the one taken out of the index above),
    # and a page still starts right after a job that left the index.
    ascending = every_page(
        lambda cursor: client.list(9, cursor, tenant="t", order="asc"), leaves_the_index_at(90)
    )
    assert ascending == [job_id for job_id in reversed(seen) if job_id != seen[69]]
    assert ascending[0] == older
    with pytest.raises(InvalidRequest, match="order"):
        client.list(tenant="t", order="up")


@pytest.fixture
def api_url(settings: Settings, tmp_path: Path) -> Iterator[str]:  # noqa: F811
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as process:
        yield process.url


def test_the_api_and_the_http_sdk_list_each_job_of_a_batch_once(api_url: str, settings: Settings):  # noqa: F811
    with Client(settings) as fleet:
        ids = submit_batch(fleet, "a")  # tenant a's key is key-a

    with httpx.Client(base_url=api_url, headers={"Authorization": "Bearer key-a"}) as api:

        def api_page(cursor: str | None) -> tuple[list[dict], str | None]:
            page = api.get("/v1/jobs", params={"limit": 30} | ({"cursor": cursor} if cursor else {})).json()
            return page["jobs"], page["next_cursor"]

        seen = every_page(api_page)
        assert sorted(seen) == sorted(ids) and len(seen) == BATCH
        # A created_at alone (the old cursor) would skip the rest of a batch: refused.
        assert api.get("/v1/jobs", params={"cursor": "1712345678.5"}).status_code == 422

    with http.Client(api_url, "key-a") as fleet:
        seen = every_page(lambda cursor: fleet.list(100, cursor))
        assert sorted(seen) == sorted(ids) and len(seen) == BATCH
        # Oldest first: the same pages the other way round.
        assert every_page(lambda cursor: fleet.list(100, cursor, order="asc")) == seen[::-1]
        with pytest.raises(InvalidRequest):
            fleet.list(order="up")
