"""The HTTP SDK's public surface, and that it stays light: what a backend outside the cluster
imports must not pull in torch, diffusers, the worker or Flower."""

from __future__ import annotations

import subprocess
import sys

import producer.http
from routing import errors
from tests.conftest import ROOT

SURFACE = {
    "AsyncClient",
    "Client",
    "Conflict",
    "FieldError",
    "FleetError",
    "InvalidRequest",
    "JobNotSucceeded",
    "JobStatus",
    "JobView",
    "NotFound",
    "OverBudget",
    "TooManyJobs",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "Webhook",
}
VERBS = {"submit", "get", "wait", "cancel", "list", "upload", "result", "download"}


def test_the_exported_surface_is_what_it_says():
    assert set(producer.http.__all__) == SURFACE
    for name in SURFACE:
        assert hasattr(producer.http, name), name
    for client in (producer.http.Client, producer.http.AsyncClient):
        assert VERBS <= set(dir(client)), client


def test_its_errors_are_the_fleets():
    for name in SURFACE - {
        "AsyncClient",
        "Client",
        "FieldError",
        "JobStatus",
        "JobView",
        "Webhook",
    }:
        assert issubclass(getattr(producer.http, name), errors.FleetError), name
    assert producer.http.InvalidRequest is errors.InvalidRequest  # one hierarchy for both SDKs


def test_importing_it_loads_nothing_heavy():
    code = (
        "import sys, producer.http; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'torch', 'diffusers', 'transformers', 'worker', 'flower'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_importing_it_loads_no_redis_celery_boto3_pyav_or_pillow():
    # -X importtime names every module the import loads, those of producer/__init__ included: the
    # Redis SDK must stay unloaded until ``producer.Client`` is touched.
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import producer.http"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    loaded = {line.rpartition("|")[2].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "producer.http" in loaded and "httpx" in loaded  # the report is read as it should be
    heavy = {"redis", "celery", "kombu", "boto3", "botocore", "av", "PIL"}
    assert sorted(m for m in loaded if m.split(".")[0] in heavy) == []


def test_the_redis_sdk_still_comes_with_the_package_when_used():
    code = "import sys, producer; assert 'redis' not in sys.modules; producer.Client; print('redis' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
