"""Retention of stored objects and of what Redis keeps: the local store's sweep (real files, ages
set with os.utime), the S3 lifecycle rules built from the settings, the settings that would let a
record outlive its outputs, and the dead-letter list's bound (real Redis)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis as redis_lib
import yaml
from pydantic import ValidationError

from routing.classes import VramClass
from routing.errors import ErrorType
from routing.io.retention import DAY_S, RetentionSweep, lifecycle_configuration, retention_days, sweep_local
from routing.io.storage import LocalStorage
from routing.jobs.keys import Keys
from routing.jobs.record import JobStatus
from routing.jobs.store import JobStore, NewJob
from routing.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
NOW = time.time()  # real now: a directory made during the test is new, not aged
JOB = "0123456789abcdef0123456789abcdef"


def _aged(storage: LocalStorage, key: str, age_s: float) -> str:
    storage.put(key, b"x", "application/octet-stream")
    os.utime(storage.root / key, (NOW - age_s, NOW - age_s))
    return key


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("outputs", f"jobs/{JOB}/output-0.png"),
        ("inputs", f"inputs/tenant-a/{JOB}/image.png"),
        ("uploads", "uploads/tenant-a/5f2c.png"),
        ("loras", f"loras/{'a' * 64}.safetensors"),
    ],
)
def test_the_sweep_deletes_what_is_past_its_kinds_retention_and_keeps_the_rest(
    tmp_path: Path, kind: str, key: str
) -> None:
    settings = Settings(
        retention_outputs_days=9, retention_inputs_days=5, retention_uploads_days=20, retention_loras_days=12
    )
    days = getattr(settings, f"retention_{kind}_days")
    storage = LocalStorage(tmp_path)
    old = _aged(storage, key, days * DAY_S + 1)
    young = _aged(storage, key.replace("/", "/young-", 1), days * DAY_S - 60)
    other = _aged(storage, "notes/2026/readme.txt", 100 * DAY_S)  # no kind: never swept

    assert sweep_local(tmp_path, retention_days(settings), now=NOW) == [old]
    assert storage.list() == sorted([young, other])


def test_each_kind_keeps_its_own_retention(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    # Ten days old: past outputs' (8) and inputs' (7) defaults, within uploads' (30).
    output = _aged(storage, f"jobs/{JOB}/output-0.png", 10 * DAY_S)
    given = _aged(storage, f"inputs/tenant-a/{JOB}/image.png", 10 * DAY_S)
    upload = _aged(storage, "uploads/tenant-a/5f2c.png", 10 * DAY_S)

    deleted = sweep_local(tmp_path, retention_days(Settings()), now=NOW)

    assert sorted(deleted) == sorted([output, given])
    assert storage.list() == [upload]


def test_the_sweep_removes_the_directories_it_empties_and_old_temp_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    _aged(storage, f"inputs/tenant-a/{JOB}/image.png", 8 * DAY_S)
    # What a write killed before its rename leaves beside the objects.
    temp = tmp_path / "jobs" / JOB / ".output-0.png.x1.tmp"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(b"partial")
    os.utime(temp, (NOW - 9 * DAY_S, NOW - 9 * DAY_S))
    for directory in (
        tmp_path / "jobs" / JOB,
        tmp_path / "inputs" / "tenant-a" / JOB,
        tmp_path / "inputs" / "tenant-a",
    ):
        os.utime(directory, (NOW - 9 * DAY_S, NOW - 9 * DAY_S))
    # A directory a write has just made, not yet holding its object.
    fresh = tmp_path / "jobs" / ("f" * 32)
    fresh.mkdir()

    sweep_local(tmp_path, retention_days(Settings()), now=NOW)

    assert not temp.exists() and not (tmp_path / "jobs" / JOB).exists()
    assert not (tmp_path / "inputs" / "tenant-a").exists()
    assert fresh.is_dir()


def test_the_fleet_sweeps_a_local_store_and_leaves_s3_to_its_lifecycle_rules(tmp_path: Path) -> None:
    sweep = RetentionSweep.for_settings(Settings(storage_dir=tmp_path, retention_sweep_interval_s=600))
    assert sweep is not None and sweep.interval_s == 600 and sweep.root == tmp_path
    assert RetentionSweep.for_settings(Settings(storage_backend="s3")) is None


def test_the_lifecycle_rules_are_the_retention_settings() -> None:
    settings = Settings(
        retention_outputs_days=9, retention_inputs_days=2, retention_uploads_days=40, retention_loras_days=3
    )
    rules = {r["Filter"]["Prefix"]: r for r in lifecycle_configuration(settings)["Rules"]}
    assert {prefix: r["Expiration"] for prefix, r in rules.items()} == {
        "jobs/": {"Days": 9},
        "inputs/": {"Days": 2},
        "uploads/": {"Days": 40},
        "loras/": {"Days": 3},
    }
    assert all(r["Status"] == "Enabled" for r in rules.values())
    assert len({r["ID"] for r in rules.values()}) == 4


def test_the_committed_lifecycle_rules_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FLEET_"):
            monkeypatch.delenv(name)
    committed = json.loads((ROOT / "deploy" / "s3-lifecycle.json").read_text())
    assert committed == lifecycle_configuration(Settings())
    # Kubernetes' settings are the same defaults, so the committed rules are theirs too.
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "config.yaml").read_text())["data"]
    for name, value in config.items():
        if name.startswith("FLEET_RETENTION_"):
            monkeypatch.setenv(name, value)
    assert committed == lifecycle_configuration(Settings())


def test_outputs_must_outlive_their_jobs_record() -> None:
    record_s = 7 * DAY_S
    with pytest.raises(ValidationError, match="FLEET_JOB_TTL_S"):
        Settings(job_ttl_s=record_s, retention_outputs_days=7)
    assert Settings(job_ttl_s=record_s - 1, retention_outputs_days=7).retention_outputs_days == 7


@pytest.mark.parametrize("kind", ["inputs", "loras"])
def test_inputs_and_loras_must_outlive_the_longest_a_job_can_wait_and_run(kind: str) -> None:
    # 1 day of waiting plus 2 attempts of 12 h: exactly 2 days.
    limits = {"max_wait_s": DAY_S, "max_attempts": 2, "max_run_s": DAY_S // 2}
    others = {"retention_inputs_days": 3, "retention_loras_days": 3}
    with pytest.raises(ValidationError, match=f"FLEET_RETENTION_{kind.upper()}_DAYS"):
        Settings(**(others | {f"retention_{kind}_days": 2}), **limits)
    assert getattr(Settings(**others, **limits), f"retention_{kind}_days") == 3


@pytest.fixture
def redis_store(redis_url: str):
    client = redis_lib.Redis.from_url(redis_url)
    yield JobStore(client, Keys(f"test-{uuid.uuid4().hex[:8]}"), ttl_s=3600)
    client.close()


def test_the_dead_letter_list_keeps_only_the_newest_entries(redis_store: JobStore) -> None:
    from worker.runner import Ended, JobRunner

    # No model runs: every job has already used its attempts (max_attempts 0) and is given up.
    pool = SimpleNamespace(vram_class=VramClass.GPU16)
    runner = JobRunner(
        redis_store, storage=None, pool=pool, worker_name="w", max_attempts=0, max_dead_letters=2
    )  # type: ignore[arg-type]
    ids = [uuid.uuid4().hex for _ in range(3)]
    for n, job_id in enumerate(ids):
        new = NewJob(
            id=job_id,
            model="z-image-turbo",
            kind="text-to-image",
            request_json="{}",
            queue="gpu16",
            message=(f"{redis_store.keys.prefix}:queue", f"message-{job_id}"),  # no worker's queue
        )
        redis_store.create([new])
        outcome = runner.run(job_id)
        assert isinstance(outcome, Ended) and outcome.status is JobStatus.FAILED
        assert outcome.error is not None and outcome.error.type is ErrorType.TOO_MANY_ATTEMPTS
        kept = [
            json.loads(raw)["id"] for raw in redis_store.client.lrange(redis_store.keys.dead_letters, 0, -1)
        ]
        # Up to the limit every entry stays; past it the oldest goes.
        assert kept == ids[: n + 1][::-1][:2]
