"""The CLI's output flags reach the request, and bad values come back naming the field."""

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


def test_output_flags_are_queued_in_the_request(redis_client):
    code, out, _ = run(
        "submit",
        "z-image-turbo",
        "--prompt",
        "a fox",
        "--num-outputs",
        "3",
        "--format",
        "webp",
        "--quality",
        "70",
    )
    assert code == 0
    code, out, _ = run("status", out.strip())
    request = json.loads(out)["request"]
    assert (request["num_outputs"], request["output_format"], request["output_quality"]) == (3, "webp", 70)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--format", "gif"], "error: output_format: "),
        (["--num-outputs", "5"], "error: num_outputs: must be at most 4 (got 5)"),
        (["--format", "jpeg", "--quality", "0"], "error: output_quality: "),
    ],
)
def test_bad_output_flags_name_the_field_and_queue_nothing(redis_client, flags, message):
    code, _, err = run("submit", "z-image-turbo", "--prompt", "a fox", *flags)
    assert code == 2
    assert err.startswith(message)
    assert redis_client.llen("gpu16") == 0
