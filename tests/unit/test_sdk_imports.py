"""The SDK and the CLI stand on the base install (``pip install .``): no torch, no diffusers, no
worker code, no Flower. The HTTP API adds the api extra and still no worker code.

Each import runs in a fresh interpreter whose ``sys.meta_path`` refuses the packages the base
install does not have, so a module that reaches for one fails here as it would on a backend that
installed only the SDK. The source scan catches the imports that only run inside a function.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What the worker and api extras, and the checkout, add over the base install.
WORKER_ONLY = {
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "accelerate",
    "tokenizers",
    "safetensors",
    "numpy",
    "ftfy",
    "einops",
    "easydict",
    "standardwebhooks",
    "wan",
    "worker",
    "localfleet",
    "tests",
}
API_ONLY = {"fastapi", "starlette", "uvicorn", "prometheus_client", "flower"}
# Served from the api extra: every other module of producer/ and routing/ is the SDK's.
API_MODULES = {
    "producer/api.py",
    "producer/body_limits.py",
    "producer/flower_sentinel.py",
    "producer/metrics.py",
    "producer/openai_door.py",
    "producer/openai_images.py",
    "producer/openai_videos.py",
}

_IMPORT_ALL = """
import importlib, importlib.abc, pkgutil, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed with the SDK")
        return None

sys.meta_path.insert(0, Refuse())
import producer, routing
names = list(MODULES)
for package in (producer, routing):
    names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    if name.rpartition(".")[2] != "__main__" and name not in SKIP:
        importlib.import_module(name)
print(sorted(n for n in sys.modules if n.partition(".")[0] in ("producer", "routing")))
"""


def _import_all(blocked: set[str], modules: list[str], skip: set[str]) -> str:
    code = f"BLOCKED = {sorted(blocked)!r}\nMODULES = {modules!r}\nSKIP = {sorted(skip)!r}\n"
    result = subprocess.run(
        [sys.executable, "-c", code + textwrap.dedent(_IMPORT_ALL)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_sdk_cli_and_routing_import_without_torch_worker_or_flower() -> None:
    skip = {name.removesuffix(".py").replace("/", ".") for name in API_MODULES}
    imported = _import_all(WORKER_ONLY | API_ONLY, ["producer.client", "producer.cli"], skip)
    for name in (
        "producer.client",
        "producer.cli",
        "producer.flower",
        "routing.jobs.store",
        "routing.io.media",
    ):
        assert repr(name) in imported, name


def test_http_api_imports_without_torch_or_worker_code() -> None:
    modules = [
        "producer.api",
        "producer.body_limits",
        "producer.flower_sentinel",
        "producer.metrics",
        "producer.openai_door",
        "producer.openai_images",
        "producer.openai_videos",
    ]
    imported = _import_all(WORKER_ONLY, modules, set())
    assert "'producer.api'" in imported


def _imported_packages(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return found


@pytest.mark.parametrize("package", ["producer", "routing"])
def test_no_import_anywhere_in_the_source_needs_an_extra(package: str) -> None:
    """Imports inside functions too, which importing the modules does not run."""
    for path in sorted((ROOT / package).rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        refused = WORKER_ONLY if name in API_MODULES else WORKER_ONLY | API_ONLY
        assert not _imported_packages(path) & refused, name
