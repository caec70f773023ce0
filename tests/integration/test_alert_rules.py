"""The alerting rules of ``deploy/prometheus/alerts.yml``: each fires where it should and stays
quiet where it should not (``promtool test rules`` on ``alerts.test.yml``), and a real Prometheus
server loads them against a real API process's /metrics: every series they read is served, every
rule evaluates without error, and a tenant whose GPU budget is spent raises its alert."""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from routing.settings import Settings
from tests.api_tenants import SMALL, A, B, api_client, tenants
from tests.conftest import ROOT, _free_port

pytestmark = pytest.mark.integration

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
INSTALL = "install Debian's prometheus package (apt), which `make test` does as root"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"no {name}: {INSTALL}")
    return path


def _rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_every_rule_passes_its_promtool_tests() -> None:
    promtool = _tool("promtool")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has a test of its own.
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested_names = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert tested_names == {rule["alert"] for rule in _rules()}


def test_prometheus_runs_the_rules_on_the_apis_metrics_and_a_spent_budget_fires(
    fleet_settings: Settings, tmp_path: Path
) -> None:
    prometheus = _tool("prometheus")
    metrics_port = _free_port()
    settings = Settings.model_validate(
        fleet_settings.model_dump()
        | {
            "tenants": tenants("a", gpu_s_per_month=0) | tenants("b"),  # a: spent before it starts
            "metrics_port": metrics_port,
            "metrics_address": "127.0.0.1",
        }
    )
    with api_client(settings, tmp_path) as api:
        assert api.post("/v1/jobs", json=SMALL, headers=A).status_code == 402
        # Every counter the rules read has a series once something was counted: a job ended.
        job = api.post("/v1/jobs", json=SMALL, headers=B).json()
        assert api.delete(f"/v1/jobs/{job['id']}", headers=B).json()["status"] == "canceled"
        with _prometheus(prometheus, tmp_path, metrics_port) as query:
            names = sorted(
                {name for rule in _rules() for name in re.findall(r"\bfleet_[a-z_]+", rule["expr"])}
            )
            missing = names
            deadline = time.monotonic() + 60
            while missing and time.monotonic() < deadline:
                missing = [name for name in names if not query("/api/v1/query", query=name)["result"]]
                time.sleep(0.5)
            assert not missing, f"series the rules read that the API does not serve: {missing}"
            rules = [r for g in query("/api/v1/rules")["groups"] for r in g["rules"]]
            assert {r["name"] for r in rules} == {rule["alert"] for rule in _rules()}
            assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
            # A rule evaluated before the scrape that brought its series holds no alert yet: the
            # next evaluation, a second later, does.
            expected = [("FleetTenantBudgetSpent", "a", "firing")]
            firing: list[tuple[str, str | None, str]] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                firing = [
                    (a["labels"]["alertname"], a["labels"].get("tenant"), a["state"])
                    for a in query("/api/v1/alerts")["alerts"]
                ]
                if firing == expected:
                    break
                time.sleep(0.5)
            assert firing == expected


@contextlib.contextmanager
def _prometheus(binary: str, tmp_path: Path, metrics_port: int) -> Iterator[Callable[..., Any]]:
    """A Prometheus server scraping ``127.0.0.1:<metrics_port>`` every second and evaluating the
    rules as often; yields a function that GETs its HTTP API and answers the ``data``."""
    port = _free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "fleet", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp_path / "prometheus.log"
    command = [
        binary,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if http.get("/-/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)

            def query(path: str, **params: str) -> Any:
                answer = http.get(path, params=params).json()
                assert answer["status"] == "success", answer
                return answer["data"]

            yield query
    finally:
        process.terminate()
        process.wait(30)
