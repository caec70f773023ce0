"""The official Wan2.2 code as the group models load it (``worker.adapters.wan_s2v.official``).

1. A ``wan22`` other than the pinned one is refused at load, naming both versions.
2. A package that no longer has an attribute a group model replaces fails at load naming it: a
   throwaway copy of the installed ``wan`` with one import renamed in one module (S2V's
   ``flash_attention``, I2V-A14B's sampler).
3. The media stand-ins are in ``sys.modules`` only while the official code imports.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def official():
    if importlib.util.find_spec("wan") is None:
        pytest.skip("wan22 is not installed (pip install --no-deps wan22==2.2.11 einops easydict)")
    for needed in ("einops", "easydict"):
        pytest.importorskip(needed)
    from worker.adapters.wan_s2v import official

    return official


def test_a_wan22_other_than_the_pinned_one_is_refused(official, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.3.0")
    monkeypatch.setattr(official, "_modules", {})  # as in a fresh worker

    with pytest.raises(official.OfficialCodeMismatch) as refused:
        official.import_wan_modules()

    assert "wan22 2.3.0 is installed" in str(refused.value)
    assert f"patch wan22 {official.WAN22_VERSION}" in str(refused.value)


# (module file, a call and the import it binds, renamed as upstream might): S2V's attention
# kernel, and the sampler I2V-A14B's progress reports come from. One copy carries both, so one
# load checks the table for the tasks'.
RENAMES = [
    (
        "modules/s2v/motioner.py",
        ("flash_attention(", "attention_kernel("),
        (
            "from ..model import flash_attention\n",
            "from ..model import flash_attention as attention_kernel\n",
        ),
    ),
    (
        "image2video.py",
        ("FlowUniPCMultistepScheduler(", "UniPCSampler("),
        (
            "from .utils.fm_solvers_unipc import FlowUniPCMultistepScheduler\n",
            "from .utils.fm_solvers_unipc import FlowUniPCMultistepScheduler as UniPCSampler\n",
        ),
    ),
]


def test_a_replaced_attribute_missing_from_the_package_fails_at_load(official, tmp_path: Path) -> None:
    installed = Path(importlib.util.find_spec("wan").submodule_search_locations[0])
    copy = tmp_path / "site" / "wan"
    shutil.copytree(installed, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for path, call, imported in RENAMES:
        module = copy / path
        source = module.read_text()
        assert imported[0] in source
        # As if upstream had renamed it: the module calls it by another name.
        module.write_text(source.replace(*call).replace(*imported))
    load = (
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(copy.parent)!r})\n"
        "print(importlib.util.find_spec('wan').origin)\n"
        "from worker.adapters.wan_s2v.official import import_wan_modules\n"
        "import_wan_modules()\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", load],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.stdout.startswith(str(copy)), result.stdout  # the copy is the one loaded
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("worker.adapters.wan_s2v.patch.OfficialCodeMismatch"), result.stderr
    assert "wan.modules.s2v.motioner.flash_attention" in last
    assert "wan.image2video.FlowUniPCMultistepScheduler" in last
    # Only what is gone.
    assert "wan.modules.model.flash_attention" not in last
    assert "wan.text2video.FlowUniPCMultistepScheduler" not in last


def test_no_media_stand_in_is_left_in_sys_modules(official) -> None:
    from worker.adapters.wan_s2v import standins

    modules = official.import_wan_modules()

    for name in ("librosa", "decord", "torchvision"):
        module = sys.modules.get(name)
        # Absent, or the real package (which has a file; a stand-in has none).
        assert module is None or getattr(module, "__file__", None), name
    # What the official code bound while it imported stays bound.
    assert modules["audio_encoder"].librosa.load is standins.librosa_load
    assert modules["speech2video"].VideoReader is standins.PyAVVideoReader
