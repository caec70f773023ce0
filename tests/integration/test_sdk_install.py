"""A backend that installs only the SDK: ``pip install .`` into a fresh virtual environment brings
no torch, diffusers, transformers, accelerate, Flower or FastAPI, and none of the test scaffolding
(``testkit``: the small-model builder, the S2V CPU stand-ins, the slow store), and that
environment's Python queues a job through ``producer.Client`` that a real worker runs to success."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from localfleet.process import settings_env
from routing.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# What the worker and api extras bring; none may come with the base install.
NOT_IN_THE_BASE = {
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "tokenizers",
    "safetensors",
    "flower",
    "fastapi",
    "uvicorn",
    "prometheus-client",
}
# Beside the packages in the checkout, never in an install.
SCAFFOLDING = ("testkit", "localfleet")

_SUBMIT = """
import json, sys
import producer
from producer import Client

with Client() as client:
    job = client.submit({"model": "z-image-turbo", "prompt": "a fox", "width": 64, "height": 64, "steps": 2})
    record = job.wait(timeout_s=120)
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "worker") if m in sys.modules)
import importlib.util
scaffolding = [m for m in ("testkit", "localfleet") if importlib.util.find_spec(m)]
print(json.dumps({"status": record.status.value, "error": record.error, "producer": producer.__file__,
                  "outputs": len(record.outputs), "heavy": heavy, "scaffolding": scaffolding}))
"""


def _project_copy(into: Path) -> Path:
    """The packages ``pip install .`` finds and the scaffolding beside them, copied: the build
    writes build/ and *.egg-info beside its sources, and a build/ left in the checkout by an
    earlier build could bring back files that are gone from it. The scaffolding is there as it
    is in a checkout, so that what leaves it out is the project's packaging."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    into.mkdir()
    shutil.copy(ROOT / "pyproject.toml", into)
    packages = [p.removesuffix("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in [*packages, *SCAFFOLDING]:
        shutil.copytree(ROOT / package, into / package, ignore=shutil.ignore_patterns("__pycache__"))
    return into


def _clean_env() -> dict[str, str]:
    """This environment without what points Python at the checkout or at another environment."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    return env | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(command: list[str], cwd: Path) -> None:
    done = subprocess.run(command, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(900)
def test_base_install_has_no_torch_and_its_sdk_runs_a_job(
    fleet_settings: Settings, start_worker, tmp_path: Path
) -> None:
    source = _project_copy(tmp_path / "project")
    # The venv gets no pip of its own (ensurepip is the slowest part of making one): this
    # interpreter's pip builds the project's wheel and installs it there with --python, as
    # `pip install .` would, without compiling the dependencies' bytecode.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip = [sys.executable, "-m", "pip", "--python", python]
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), str(source)], tmp_path
    )
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
        shipped = archive.namelist()
    assert {"routing", "producer", "worker"} <= top, sorted(top)
    assert not top & set(SCAFFOLDING), sorted(top)
    assert not [n for n in shipped if "small_models" in n or n.startswith("worker/adapters/wan_s2v/cpu")]
    _run([*pip, "install", "--quiet", "--no-compile", str(wheel)], tmp_path)

    show = subprocess.run([*pip, "show", "torch"], env=_clean_env(), capture_output=True, text=True)
    assert show.returncode != 0 and not show.stdout, show.stdout
    listed = subprocess.run(
        [*pip, "list", "--format=json"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert "gpu-fleet" in installed
    assert not installed & NOT_IN_THE_BASE, sorted(installed & NOT_IN_THE_BASE)

    # The light SDK is light in the light install: importing it loads nothing of the Redis SDK's.
    imported = subprocess.run(
        [python, "-X", "importtime", "-c", "import producer.http"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = {line.rpartition("|")[2].strip() for line in imported.stderr.splitlines() if "|" in line}
    assert "producer.http" in loaded and "httpx" in loaded
    heavy = {"redis", "celery", "kombu", "boto3", "botocore", "av", "PIL"}
    assert sorted(m for m in loaded if m.split(".")[0] in heavy) == []

    start_worker()
    submitted = subprocess.run(
        [python, "-c", textwrap.dedent(_SUBMIT)],
        cwd=tmp_path,
        env=settings_env(fleet_settings, _clean_env()),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert submitted.returncode == 0, submitted.stderr
    result = json.loads(submitted.stdout)
    assert result["status"] == "succeeded", result["error"]
    assert result["outputs"] == 1
    # The installed SDK ran, not the checkout's, and it loaded nothing of the worker side.
    assert Path(result["producer"]).is_relative_to(venv), result["producer"]
    assert result["heavy"] == []
    assert result["scaffolding"] == []
