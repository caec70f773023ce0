"""The limits a request is validated under: one value, passed in, never read from the process's
settings, and kept with the job as it was accepted."""

from __future__ import annotations

import pytest

from routing.errors import InvalidRequest
from routing.jobs.record import JobRecord
from routing.limits import DEFAULT_LIMITS, RequestLimits
from routing.schemas import parse_request
from routing.settings import Settings, get_settings

LORA = {"source": "loras/" + "0" * 64 + ".safetensors"}
IMAGE = {"model": "z-image-turbo", "prompt": "a fox"}


def test_the_defaults_are_the_settings_defaults():
    assert DEFAULT_LIMITS == RequestLimits() == RequestLimits.from_settings(Settings())


def test_they_are_read_from_settings(monkeypatch):
    monkeypatch.setenv("FLEET_MAX_NUM_OUTPUTS", "2")
    monkeypatch.setenv("FLEET_MAX_LORAS", "1")
    assert RequestLimits.from_settings(Settings()) == RequestLimits(max_num_outputs=2, max_loras=1)


@pytest.fixture
def tight_environment(monkeypatch):
    """The process's settings allow one output and no LoRA."""
    monkeypatch.setenv("FLEET_MAX_NUM_OUTPUTS", "1")
    monkeypatch.setenv("FLEET_MAX_LORAS", "0")
    get_settings.cache_clear()
    assert (get_settings().max_num_outputs, get_settings().max_loras) == (1, 0)
    yield
    get_settings.cache_clear()


def test_validation_reads_only_the_limits_passed_in(tight_environment):
    loose = RequestLimits(max_num_outputs=4, max_loras=3)
    request = parse_request({**IMAGE, "num_outputs": 4, "loras": [LORA] * 3}, limits=loose)
    assert (request.num_outputs, len(request.loras)) == (4, 3)
    # The default is the settings' defaults, not this process's environment.
    assert parse_request({**IMAGE, "num_outputs": 4, "loras": [LORA] * 3}).num_outputs == 4


def test_limits_passed_in_refuse_what_the_environment_would_allow(monkeypatch):
    monkeypatch.setenv("FLEET_MAX_NUM_OUTPUTS", "16")
    monkeypatch.setenv("FLEET_MAX_LORAS", "8")
    get_settings.cache_clear()
    try:
        tight = RequestLimits(max_num_outputs=1, max_loras=1)
        with pytest.raises(InvalidRequest) as raised:
            parse_request({**IMAGE, "num_outputs": 2, "loras": [LORA] * 2}, limits=tight)
    finally:
        get_settings.cache_clear()
    assert [(e.field, e.message) for e in raised.value.errors] == [
        ("loras", "at most 1 LoRAs a request (got 2)"),
        ("num_outputs", "must be at most 1 (got 2)"),
    ]


def test_they_round_trip_through_json():
    limits = RequestLimits(max_num_outputs=7, max_loras=0)
    assert RequestLimits.from_json(limits.to_json()) == limits
    # Stored by another release: a limit it did not know takes its default, one it had is ignored.
    assert RequestLimits.from_json('{"max_num_outputs": 2}') == RequestLimits(max_num_outputs=2)
    assert RequestLimits.from_json('{"max_num_outputs": 2, "gone": 5}') == RequestLimits(max_num_outputs=2)


@pytest.mark.parametrize("text", ["", "[]", "3", '{"max_loras": "3"}', '{"max_loras": true}', "{"])
def test_malformed_limits_are_refused(text):
    with pytest.raises(ValueError):
        RequestLimits.from_json(text)


def _raw(**extra: str) -> dict[str, str]:
    return {
        "id": "j",
        "model": "z-image-turbo",
        "kind": "text-to-image",
        "request": "{}",
        "status": "queued",
        "queue": "gpu16",
        "created_at": "1.0",
        "updated_at": "1.0",
    } | extra


def test_the_record_keeps_them_and_an_older_record_has_none():
    limits = RequestLimits(max_num_outputs=3, max_loras=2)
    assert JobRecord.from_hash(_raw(limits=limits.to_json())).limits == limits
    assert JobRecord.from_hash(_raw()).limits is None
    assert JobRecord.from_hash(_raw(limits="")).limits is None
