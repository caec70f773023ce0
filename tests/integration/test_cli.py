"""The command line over the SDK: submit, list, status, cancel (the wait path runs in test_spine)."""

from __future__ import annotations

import io
import json

import pytest

from producer import cli

pytestmark = pytest.mark.integration


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def settings(fleet_settings, monkeypatch):
    monkeypatch.setattr("producer.client.get_settings", lambda: fleet_settings)
    return fleet_settings


def test_submit_list_status_cancel(redis_client):
    code, out, _ = run(
        "submit",
        "z-image-turbo",
        "--prompt",
        "a fox",
        "--width",
        "64",
        "--height",
        "64",
        "--priority",
        "low",
        "--tenant",
        "cli",
    )
    assert code == 0
    job_id = out.strip()
    assert redis_client.llen("gpu16.low") == 1

    code, out, _ = run("list", "--tenant", "cli")
    assert code == 0 and out.startswith(job_id) and "queued" in out
    # A later job lists first, and last with --order asc.
    code, later, _ = run(
        "submit", "z-image-turbo", "--prompt", "a hen", "--width", "64", "--height", "64", "--tenant", "cli"
    )
    assert code == 0
    code, out, _ = run("list", "--tenant", "cli")
    assert [line.split()[0] for line in out.splitlines()] == [later.strip(), job_id]
    code, out, _ = run("list", "--tenant", "cli", "--order", "asc")
    assert [line.split()[0] for line in out.splitlines()] == [job_id, later.strip()]

    code, out, _ = run("status", job_id)
    record = json.loads(out)
    assert (record["status"], record["priority"], record["request"]["width"]) == ("queued", "low", 64)

    code, out, _ = run("cancel", job_id)
    assert code == 0 and out.strip() == f"{job_id} canceled"


def test_bad_input_exits_2_naming_the_field(redis_client):
    code, _, err = run("submit", "z-image-turbo", "--prompt", "x", "--width", "100")
    assert code == 2
    assert "error: width: must be a multiple of 16" in err
    assert redis_client.llen("gpu16") == 0


def test_unknown_job_exits_1():
    code, _, err = run("status", "f" * 32)
    assert code == 1 and "no job" in err
