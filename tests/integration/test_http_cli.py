"""The command line over the HTTP API: a real uvicorn process and worker, the CLI in its own
process with only a URL and an API key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from localfleet.process import ApiProcess
from tests.conftest import ROOT, _free_port
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
    with ApiProcess(settings, tmp_path / "api.log", _free_port()).wait_ready(60) as api:
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
