"""The TypeScript client (clients/typescript), generated from the live API's OpenAPI document,
submits a job, follows its events to the end and fetches the output: a backend in another
language gets a typed client from /openapi.json."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from localfleet.process import ApiProcess
from tests.conftest import ROOT
from tests.integration.test_api import settings  # noqa: F401  (the S3 + tenants settings fixture)

pytestmark = pytest.mark.integration

CLIENT = ROOT / "clients" / "typescript"


def _npm(*args: str, env: dict[str, str] | None = None, timeout_s: float = 300) -> str:
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("the TypeScript client's test needs node 20 and npm on PATH")
    done = subprocess.run(
        [npm, *args], cwd=CLIENT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert done.returncode == 0, f"npm {' '.join(args)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def test_the_generated_typescript_client_runs_a_job(settings, start_worker, tmp_path: Path):  # noqa: F811
    _npm("ci", "--no-audit", "--no-fund")
    start_worker(settings)
    with ApiProcess(settings, tmp_path / "api.log").wait_ready(60) as api:
        env = os.environ | {
            "FLEET_API_URL": api.url,
            "FLEET_API_KEY": "key-a",
            "FLEET_OPENAPI": f"{api.url}/openapi.json",  # generated from the live document
        }
        output = _npm("test", env=env)
    assert "# pass 2" in output and "# fail 0" in output, output
