"""The command line over the HTTP API: a real uvicorn process and worker, the CLI in its own
process with only a URL and an API key. The same flags give the same request over Redis, failed
and canceled jobs end the CLI with their error, and input media and LoRAs go up from local files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from localfleet.process import ApiProcess
from producer import cli as cli_module
from producer.client import Client
from routing.jobs.record import JobStatus
from routing.settings import Settings
from testkit.small_models.lora import build_lora
from tests.conftest import ROOT
from tests.faults.harness import FAULT_ADAPTER
from tests.integration.test_api import settings  # noqa: F401  (the S3 + tenants settings fixture)

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # No FLEET_REDIS_URL or storage settings: the API is all this process can reach.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    return subprocess.run(
        [sys.executable, "-m", "producer", *args],
        cwd=ROOT,
        env=clean | (env or {}),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_submit_with_a_progress_bar_then_the_saved_output(settings, start_worker, tmp_path: Path):  # noqa: F811
    start_worker(settings)
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as api:
        done = cli(
            "--api", api.url, "--key", "key-a",
            "submit", "z-image-turbo", "--prompt", "a fox", "--width", "64", "--height", "80", "--steps", "2",
            "--wait", "--out", str(tmp_path / "out"),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.splitlines()[0]
        assert "succeeded" in done.stderr and "2/2 steps" in done.stderr  # the bar's last state
        [line] = [line for line in done.stdout.splitlines() if line.startswith("output: ")]
        path = Path(line.split()[1])
        assert path.parent == (tmp_path / "out").resolve() and Image.open(path).size == (64, 80)

        # The same from the environment; the record and the list come from the API.
        env = {"FLEET_API_URL": api.url, "FLEET_API_KEY": "key-a"}
        status = cli("status", job_id, env=env)
        assert status.returncode == 0 and '"status": "succeeded"' in status.stdout
        assert job_id in cli("list", env=env).stdout

        other_tenant = cli("--api", api.url, "--key", "key-b", "status", job_id)
        assert other_tenant.returncode == 1 and "no job" in other_tenant.stderr
        refused = cli(
            "--api", api.url, "--key", "key-a", "submit", "z-image-turbo", "--prompt", "x", "--width", "65"
        )
        assert refused.returncode == 2 and "width:" in refused.stderr
    no_key = cli("--api", "http://127.0.0.1:9", "status", job_id)
    assert no_key.returncode == 2 and "FLEET_API_KEY" in no_key.stderr


def in_process(*argv: str) -> tuple[int, str, str]:
    """The same CLI over Redis, in this process (its settings are the test's)."""
    out, err = io.StringIO(), io.StringIO()
    code = cli_module.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def over_redis(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:  # noqa: F811
    monkeypatch.setattr("producer.client.get_settings", lambda: settings)
    return settings


def picture(path: Path, hue: int) -> Path:
    image = Image.new("RGB", (64, 64), (hue, 100, 255 - hue))
    ImageDraw.Draw(image).ellipse((16, 8, 48, 56), fill=(255 - hue, 200, hue))
    image.save(path)
    return path


def test_failed_and_canceled_jobs_end_the_cli_with_their_error_and_no_traceback(
    settings,  # noqa: F811
    start_worker,
    tmp_path: Path,
):
    start_worker(settings.model_copy(update={"adapters": {"z-image-turbo": FAULT_ADAPTER}}))
    small = ("--width", "64", "--height", "64", "--steps", "2")
    with (
        ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as api,
        Client(settings) as fleet,
    ):
        key = ("--api", api.url, "--key", "key-a")
        prompt = "an unknown fault:directive=1 is a model error"
        submitted = cli(*key, "submit", "z-image-turbo", "--prompt", prompt, *small, "--wait")
        job_id = submitted.stdout.splitlines()[0]
        record = fleet.get(job_id)
        assert record.status is JobStatus.FAILED and record.error.message
        waited = cli(*key, "wait", job_id)
        for done in (submitted, waited):
            assert done.returncode == 1, done.stderr
            assert f"job {job_id} failed: {record.error.message}" in done.stderr
            assert "Traceback" not in done.stderr

        slow = cli(*key, "submit", "z-image-turbo", "--prompt", "a fox fault:sleep=0.5", "--width", "64",
                   "--height", "64", "--steps", "40")  # fmt: skip
        slow_id = slow.stdout.strip()
        assert cli(*key, "cancel", slow_id).returncode == 0
        waited = cli(*key, "wait", slow_id, "--timeout", "120")
        record = fleet.get(slow_id)
        assert record.status is JobStatus.CANCELED
        assert waited.returncode == 1, waited.stderr
        reason = f": {record.error.message}" if record.error else ""
        assert f"job {slow_id} canceled{reason}" in waited.stderr
        assert "Traceback" not in waited.stderr
        # Ended, both are deleted now, and asked again (FLEET_DELETED_JOB_TTL_S) they are deleted
        # still; a job that never was is an error naming it.
        for ended in (job_id, slow_id, job_id):
            deleted = cli(*key, "delete", ended)
            assert deleted.returncode == 0 and deleted.stdout.strip() == f"{ended} deleted", deleted.stderr
        unknown = uuid.uuid4().hex
        never = cli(*key, "delete", unknown)
        assert never.returncode == 1 and "Traceback" not in never.stderr and unknown in never.stderr


def test_the_same_flags_make_the_same_request_over_http_and_over_redis(
    settings,  # noqa: F811
    over_redis,
    small_models_dir: Path,
    tmp_path: Path,
):
    lora = build_lora(small_models_dir / "z-image-turbo", "z-image-turbo", tmp_path / "style.safetensors")
    flags = (
        "submit", "z-image-turbo", "--prompt", "a fox", "--negative-prompt", "blur",
        "--width", "64", "--height", "80", "--steps", "3", "--guidance-scale", "1.5", "--seed", "7",
        "--num-outputs", "2", "--format", "webp", "--quality", "70", "--priority", "low",
        "--lora", f"{lora}@0.5",
    )  # fmt: skip
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as api:
        over_http = cli("--api", api.url, "--key", "key-a", *flags)
        assert over_http.returncode == 0, over_http.stderr
        code, out, err = in_process(*flags, "--tenant", "a")
        assert code == 0, err
        records = []
        for job_id in (over_http.stdout.strip(), out.strip()):
            status = cli("--api", api.url, "--key", "key-a", "status", job_id)
            assert status.returncode == 0, status.stderr
            records.append(json.loads(status.stdout))
    http_record, redis_record = records
    assert http_record["request"] == redis_record["request"]
    assert (http_record["priority"], http_record["queue"]) == (
        redis_record["priority"],
        redis_record["queue"],
    )
    request = http_record["request"]
    assert (request["num_outputs"], request["output_format"], request["output_quality"]) == (2, "webp", 70)
    assert (request["negative_prompt"], request["seed"], request["guidance_scale"]) == ("blur", 7, 1.5)
    [stored_lora] = request["loras"]
    assert stored_lora["scale"] == 0.5 and stored_lora["source"].startswith("loras/")


def test_edit_image_to_video_and_lora_jobs_from_local_files(
    settings,  # noqa: F811
    over_redis,
    start_worker,
    small_models_dir: Path,
    tmp_path: Path,
):
    start_worker(settings.model_copy(update={"worker_class": "gpu80"}))  # runs gpu80 and gpu16 jobs
    lora = build_lora(small_models_dir / "z-image-turbo", "z-image-turbo", tmp_path / "style.safetensors")
    small = ("--width", "64", "--height", "64", "--steps", "2", "--seed", "5", "--wait")
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as api:
        key = ("--api", api.url, "--key", "key-a")
        edit = cli(*key, "submit", "qwen-image-edit", "--prompt", "add a hat",
                   "--image", str(picture(tmp_path / "cat.png", 40)), *small, "--out", str(tmp_path / "edit"))  # fmt: skip
        with_lora = cli(*key, "submit", "z-image-turbo", "--prompt", "a fox", "--lora", f"{lora}@0.8",
                        *small, "--out", str(tmp_path / "lora"))  # fmt: skip
        # Image to video over Redis: the SDK stores the local file itself.
        code, out, err = in_process(
            "submit", "wan2.2-ti2v-5b", "--kind", "image-to-video", "--prompt", "it moves",
            "--image", str(picture(tmp_path / "first.png", 200)), "--frames", "5", *small,
            "--tenant", "a", "--out", str(tmp_path / "video"),
        )  # fmt: skip
        with Client(settings) as fleet:
            for done, content_type in ((edit, "image/png"), (with_lora, "image/png")):
                assert done.returncode == 0, done.stderr
                [line] = [x for x in done.stdout.splitlines() if x.startswith("output: ")]
                assert f" {content_type} 64x64 " in line and Image.open(line.split()[1]).size == (64, 64)
            assert code == 0, err
            [line] = [x for x in out.splitlines() if x.startswith("output: ")]
            assert " video/mp4 64x64 " in line and Path(line.split()[1]).stat().st_size > 0
            edit_request = fleet.get(edit.stdout.splitlines()[0]).request
            [image] = edit_request["images"]
            assert image["key"].startswith("uploads/")
            [stored_lora] = fleet.get(with_lora.stdout.splitlines()[0]).request["loras"]
            assert stored_lora == {"source": stored_lora["source"], "scale": 0.8, "expert": "both"}
            assert stored_lora["source"].startswith("loras/")
            video_request = fleet.get(out.splitlines()[0]).request
            assert video_request["image"]["key"].startswith("uploads/")
