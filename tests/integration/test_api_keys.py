"""API keys a tenant makes and revokes itself, through a real uvicorn API process and real Redis:
a new key works at once and is shown once, a revoked one is refused from the next request on
(bodies included), each tenant sees and revokes only its own, and the per-tenant limit holds at
its edge. Ops make and revoke keys over Redis with the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from localfleet.process import ApiProcess
from producer.http import Client as HttpClient
from routing.errors import NotFound, Unauthorized
from routing.settings import Settings
from tests.api_tenants import SMALL, A, B, api_client, tenants
from tests.dropped import DropFirstResponse
from tests.faults.harness import RedisServer

pytestmark = pytest.mark.integration

MAX_KEYS = 3
TENANTS = tenants("a", "b")  # the same secrets in the API and the CLI's environment


@pytest.fixture
def settings(fleet_settings: Settings) -> Settings:
    return Settings.model_validate(
        fleet_settings.model_dump() | {"tenants": TENANTS, "max_keys_per_tenant": MAX_KEYS}
    )


@pytest.fixture
def api(settings: Settings, tmp_path: Path) -> Iterator[httpx.Client]:
    with api_client(settings, tmp_path) as http:
        yield http


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_new_key_works_at_once_and_a_revoked_one_is_refused_from_the_next_request(api):
    made = api.post("/v1/keys", json={"label": "ci deploys"}, headers=A)
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    key_id = made.json()["id"]
    assert key.startswith(f"fk_{key_id}_") and made.json()["label"] == "ci deploys"

    submitted = api.post("/v1/jobs", json=SMALL, headers=_bearer(key))
    assert submitted.status_code == 201, submitted.text
    # The new key is tenant a's: a's other key sees the job, b's does not.
    job = submitted.json()["id"]
    assert api.get(f"/v1/jobs/{job}", headers=A).status_code == 200
    assert api.get(f"/v1/jobs/{job}", headers=B).status_code == 404
    # Listed without the key itself, and never shown again.
    listed = api.get("/v1/keys", headers=_bearer(key)).json()["keys"]
    assert [(k["id"], k["label"]) for k in listed] == [(key_id, "ci deploys")]
    assert key not in api.get("/v1/keys", headers=A).text

    assert api.delete(f"/v1/keys/{key_id}", headers=A).status_code == 204
    refused = api.get("/v1/jobs", headers=_bearer(key))
    assert refused.status_code == 401 and refused.json()["detail"] == "unknown API key"
    # A body is refused before it is read, as for any unknown key.
    body_refused = api.post("/v1/jobs", json=SMALL, headers=_bearer(key))
    assert (body_refused.status_code, body_refused.json()["detail"]) == (
        401,
        "send Authorization: Bearer <api key> of your tenant",
    )
    assert api.get("/v1/keys", headers=A).json()["keys"] == []
    assert api.delete(f"/v1/keys/{key_id}", headers=A).status_code == 404  # revoked once


def test_a_tenant_sees_and_revokes_only_its_own_keys(api):
    theirs = api.post("/v1/keys", json={}, headers=B).json()

    assert api.get("/v1/keys", headers=A).json()["keys"] == []
    # Another tenant's key reads as one that does not exist, and stays working.
    for key_id in (theirs["id"], "0123456789ab"):
        answer = api.delete(f"/v1/keys/{key_id}", headers=A)
        assert (answer.status_code, answer.json()) == (404, {"detail": f"no key {key_id}"})
    assert api.get("/v1/jobs", headers=_bearer(theirs["key"])).status_code == 200
    assert api.delete("/v1/keys/not-a-key-id", headers=A).status_code == 404
    # A made-up key of the managed form is unknown, not an error.
    forged = f"fk_{theirs['id']}_" + "A" * 43
    assert api.get("/v1/jobs", headers=_bearer(forged)).status_code == 401


def test_a_tenant_makes_at_most_max_keys(api):
    for i in range(MAX_KEYS):
        assert api.post("/v1/keys", json={"label": f"k{i}"}, headers=A).status_code == 201

    over = api.post("/v1/keys", json={"label": "one more"}, headers=A)

    assert over.status_code == 409
    assert f"has {MAX_KEYS} keys (FLEET_MAX_KEYS_PER_TENANT)" in over.json()["detail"]
    assert len(api.get("/v1/keys", headers=A).json()["keys"]) == MAX_KEYS
    assert api.post("/v1/keys", json={"label": "x" * 101}, headers=A).status_code == 422
    # Revoking one makes room again; the other tenant's room was never taken.
    first = api.get("/v1/keys", headers=A).json()["keys"][0]["id"]
    assert api.delete(f"/v1/keys/{first}", headers=A).status_code == 204
    assert api.post("/v1/keys", json={}, headers=A).status_code == 201
    assert api.post("/v1/keys", json={}, headers=B).status_code == 201


def test_ops_make_list_and_revoke_a_tenants_keys_over_redis(api, settings):
    env = {
        **os.environ,
        "FLEET_REDIS_URL": settings.redis_url,
        "FLEET_KEY_PREFIX": settings.key_prefix,
        "FLEET_TENANTS": json.dumps(TENANTS),
    }

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "producer", "keys", *argv]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    made = run("create", "--tenant", "a", "--label", "bootstrap")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert api.get("/v1/jobs", headers=_bearer(key)).status_code == 200
    listed = run("list", "--tenant", "a")
    [line] = listed.stdout.splitlines()
    key_id = line.split()[0]
    assert key.startswith(f"fk_{key_id}_") and line.endswith("  bootstrap")
    assert run("revoke", key_id, "--tenant", "a").returncode == 0
    assert api.get("/v1/jobs", headers=_bearer(key)).status_code == 401
    # A tenant the settings do not name gets no key.
    refused = run("create", "--tenant", "nobody")
    assert refused.returncode == 2 and "'nobody' is not one of FLEET_TENANTS" in refused.stderr
    assert redis.Redis.from_url(settings.redis_url).keys(f"{settings.key_prefix}:tenant:nobody:*") == []


def test_the_http_sdk_makes_lists_and_revokes_the_tenants_keys(api):
    with HttpClient(str(api.base_url), "key-b") as fleet:
        made, key = fleet.create_key("sdk")
        assert [k.id for k in fleet.list_keys()] == [made.id] and made.label == "sdk"
        with HttpClient(str(api.base_url), key) as rotated:
            assert rotated.list_keys() == [made]
            rotated.revoke_key(made.id)  # a key may revoke itself
            with pytest.raises(Unauthorized):
                rotated.list_keys()
        assert fleet.list_keys() == []
        # The first answer is lost; the retry finds the key gone, which is what was asked.
        second, _ = fleet.create_key("lost answer")
        dropping = DropFirstResponse(lambda r: r.method == "DELETE")
        with HttpClient(str(api.base_url), "key-b", transport=dropping) as retrying:
            retrying.revoke_key(second.id)
        assert dropping.dropped == 1 and fleet.list_keys() == []
        with pytest.raises(NotFound):  # asked again, with no answer lost: a plain 404
            fleet.revoke_key(second.id)
        # A key revoking itself, the answer lost: the retry is refused the key (401), which is
        # the revocation asked for too.
        third, key = fleet.create_key("itself")
        dropping = DropFirstResponse(lambda r: r.method == "DELETE")
        with HttpClient(str(api.base_url), key, transport=dropping) as itself:
            itself.revoke_key(third.id)
            assert dropping.dropped == 1
            with pytest.raises(Unauthorized):
                itself.list_keys()
        assert fleet.list_keys() == []


def test_a_made_key_meets_a_redis_outage_with_503_not_401(settings, tmp_path):
    # The key's lookup needs Redis: while it is down the answer is the fleet's (503, retry), not
    # the key's (401, which a client would take as revoked).
    server = RedisServer(tmp_path / "redis")
    server.start()
    own = settings.model_copy(update={"redis_url": server.url, "redis_retries": 0})
    try:
        with ApiProcess(own, tmp_path / "api.log").wait_ready(60) as process:
            with httpx.Client(base_url=process.url, timeout=60, trust_env=False) as api:
                key = api.post("/v1/keys", json={}, headers=A).json()["key"]
                server.stop()
                for answer in (
                    api.get("/v1/jobs", headers=_bearer(key)),
                    api.post("/v1/jobs", json=SMALL, headers=_bearer(key)),
                ):
                    assert answer.status_code == 503, answer.text
    finally:
        if server.is_up():
            server.stop()


def test_a_request_with_a_body_looks_its_made_key_up_once(api, settings):
    key = api.post("/v1/keys", json={"label": "once"}, headers=A).json()["key"]
    store = redis.Redis.from_url(settings.redis_url)
    db = store.connection_pool.connection_kwargs.get("db", 0)
    # Every command the API sends to its database while it answers, as Redis runs them.
    with store.monitor() as monitor:
        submitted = api.post("/v1/jobs", json=SMALL, headers=_bearer(key))
        listed = api.get("/v1/jobs", headers=_bearer(key))
        api.get("/healthz")  # its PING ends the commands of the two calls above
        commands: list[str] = []
        while (seen := monitor.next_command())["command"] != "PING" or seen["db"] != db:
            if seen["db"] == db:
                commands.append(seen["command"])

    assert submitted.status_code == 201 and listed.status_code == 200
    # One lookup for the POST (the body's check; the route takes the tenant it found), one for
    # the GET, which has no body to check.
    assert sum(1 for c in commands if c.startswith("GET ") and ":apikey:" in c) == 2, commands
